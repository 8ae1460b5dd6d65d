"""Model configurations: one dataclass for every architecture the paper compares.

Named presets ``<arch>-<layers>-<heads>`` (64 dims per head, width d = 64 h):

  gpt2        LayerNorm with bias, GELU MLP d->4d->d, tied embedding/head, rotary on 1/4
              of the head dims (base 10,000; GPT-NeoX style), biases on linears
  gpt2quarter GPT2 with the MLP d->d->d (paper: GPT2_1/4)
  gpt2nomlp   GPT2 without MLP (paper: GPT2_0)
  gpt2moe     GPT2 whose MLP is 32 experts of d->d->d, top-1, capacity factor 2 (train) / 8 (eval)
  llama       RMSNorm, gated SiLU MLP with 8 d^2 parameters, untied head, full rotary, no biases
  llamaplain  LLaMA with a standard SiLU MLP d->4d->d (the paper's test of the gated MLP)
  mistral     LLaMA with a gated MLP of 10.5 d^2 and grouped-query attention

**kcap readings**: gated hidden widths are rounded to the nearest integer (8 d^2 / 3 d per
matrix is not an integer for every d). Mistral's "4 KV groups when h % 4 == 0, 2 when h is
even, 1 when odd" is read as the number of query heads sharing one KV head, as in Mistral 7B
(32 heads, 8 KV heads): kv_heads = h / 4, h / 2 or h.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from kcap.field_types import check_fields

ARCHS = ("gpt2", "gpt2quarter", "gpt2nomlp", "gpt2moe", "llama", "llamaplain", "mistral")
ATTN_IMPLS = ("auto", "torch", "triton")  # auto: triton on CUDA tensors, torch elsewhere
MLP_IMPLS = ("auto", "torch", "triton", "split")  # split: cuBLAS + an elementwise kernel
LOSS_IMPLS = ("auto", "torch", "triton")  # triton: kcap.kernels.linear_cross_entropy
ROUTER_IMPLS = ("auto", "cpp", "torch")  # auto: C++ when built, for CPU tensors
MLPS = ("gelu", "silu", "gated", "none")  # gated: SiLU-gated


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int
    n_head: int
    vocab_size: int
    n_kv_head: int | None = None    # None: n_head (no GQA)
    head_dim: int = 64
    context: int = 512
    norm: str = "layernorm"         # layernorm (with bias) | rmsnorm
    mlp: str = "gelu"               # gelu | silu | gated (SiLU-gated) | none
    mlp_hidden: int = 0             # hidden width of the MLP (or of each expert)
    bias: bool = True               # biases on linear layers
    tied: bool = True               # LM head shares the embedding
    rotary_fraction: float = 0.25   # fraction of each head's dims that rotate (0: none)
    rotary_base: float = 10_000.0
    learned_pos: bool = False       # learned absolute positions (original GPT2)
    n_experts: int = 0              # > 0: MoE MLP with this many experts
    top_k: int = 1
    capacity_factor_train: float = 2.0
    capacity_factor_eval: float = 8.0
    aux_loss_coef: float = 0.01     # load balancing (Switch Transformer form)
    router_impl: str = "auto"       # MoE router: auto (C++ when built, for CPU tensors) | cpp | torch
    attn_impl: str = "auto"
    mlp_impl: str = "auto"          # dense MLPs: auto = torch (faster, measured); MoE: Triton on CUDA
    loss_impl: str = "auto"         # LM head + loss: triton fuses them (no full logits)
    init_std: float = 0.02

    @property
    def d_model(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def rotary_dims(self) -> int:
        return 2 * int(self.head_dim * self.rotary_fraction / 2)

    def __post_init__(self):
        check_fields(self)  # types first: tied="false" would otherwise count as True

        def need(cond, msg):
            if not cond:
                raise ValueError(msg)
        need(self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("n_layer", "n_head", "vocab_size", "head_dim", "context"):
            need(getattr(self, name) >= 1,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.n_kv_head is None or self.n_kv_head >= 1,
             f"n_kv_head must be >= 1 or None, got {self.n_kv_head}")
        need(self.n_head % self.kv_heads == 0,
             f"n_kv_head ({self.kv_heads}) must divide n_head ({self.n_head})")
        need(self.norm in ("layernorm", "rmsnorm"), f"norm must be layernorm or rmsnorm, got {self.norm!r}")
        need(self.mlp in MLPS, f"mlp must be one of {MLPS}, got {self.mlp!r}")
        need(self.mlp_hidden >= 0, f"mlp_hidden must be >= 0, got {self.mlp_hidden}")
        need(self.mlp == "none" or self.mlp_hidden >= 1, f"mlp_hidden must be >= 1 with mlp "
             f"{self.mlp!r}, got {self.mlp_hidden}")
        need(0.0 <= self.rotary_fraction <= 1.0, f"rotary_fraction must be in [0, 1], got {self.rotary_fraction}")
        need(self.rotary_base > 0, f"rotary_base must be > 0, got {self.rotary_base}")
        need(self.n_experts >= 0, f"n_experts must be >= 0, got {self.n_experts}")
        need(self.top_k >= 1 and (self.n_experts == 0 or self.top_k <= self.n_experts),
             f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        for name in ("capacity_factor_train", "capacity_factor_eval", "init_std"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.aux_loss_coef >= 0, f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        need(self.attn_impl in ATTN_IMPLS,
             f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        need(self.router_impl in ROUTER_IMPLS,
             f"router_impl must be one of {ROUTER_IMPLS}, got {self.router_impl!r}")
        need(self.mlp_impl in MLP_IMPLS,
             f"mlp_impl must be one of {MLP_IMPLS}, got {self.mlp_impl!r}")
        need(self.loss_impl in LOSS_IMPLS,
             f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")


def resolve_impl(impl: str, x) -> str:
    """An attn_impl / mlp_impl / loss_impl for tensor x: 'auto' is triton on CUDA tensors,
    torch elsewhere."""
    if impl == "auto":
        return "triton" if x.is_cuda else "torch"
    return impl


def under_autocast(*tensors):
    """The tensors cast to the active autocast dtype (custom ops get no autocast of their own,
    while the torch path's matmuls do), or unchanged when autocast is off."""
    import torch

    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t is None else t.to(dtype) for t in tensors)


def mistral_kv_heads(n_head: int) -> int:
    """The paper's rule: groups of 4 query heads per KV head if h % 4 == 0, 2 if h is even, else 1."""
    group = 4 if n_head % 4 == 0 else 2 if n_head % 2 == 0 else 1
    return n_head // group


def model_config(name: str, vocab_size: int, **overrides) -> ModelConfig:
    """ModelConfig of a preset name such as 'gpt2-12-12', 'llama-4-8', 'gpt2moe-4-8'.

    ``overrides`` replace any field (e.g. ``tied=True`` for a tied LLaMA, ``context=256``).
    """
    match = re.fullmatch(r"([a-z0-9]+)-([0-9]+)-([0-9]+)", name or "")
    if not match or match.group(1) not in ARCHS:
        raise ValueError(f"unknown model name {name!r}: expected <arch>-<layers>-<heads> with arch "
                         f"in {ARCHS}, e.g. gpt2-12-12")
    arch, n_layer, n_head = match.group(1), int(match.group(2)), int(match.group(3))
    d = 64 * n_head
    base = dict(arch=arch, n_layer=n_layer, n_head=n_head, vocab_size=vocab_size)
    if arch.startswith("gpt2"):
        base.update(norm="layernorm", mlp="gelu", mlp_hidden=4 * d, bias=True, tied=True,
                    rotary_fraction=0.25)
        if arch == "gpt2quarter":
            base.update(mlp_hidden=d)
        elif arch == "gpt2nomlp":
            base.update(mlp="none", mlp_hidden=0)
        elif arch == "gpt2moe":
            base.update(mlp_hidden=d, n_experts=32, top_k=1)
    else:
        base.update(norm="rmsnorm", mlp="gated", mlp_hidden=round(8 * d / 3), bias=False,
                    tied=False, rotary_fraction=1.0)
        if arch == "llamaplain":
            base.update(mlp="silu", mlp_hidden=4 * d)
        elif arch == "mistral":
            base.update(mlp_hidden=round(3.5 * d), n_kv_head=mistral_kv_heads(n_head))
    unknown = set(overrides) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}")
    return replace(ModelConfig(**base), **overrides)
