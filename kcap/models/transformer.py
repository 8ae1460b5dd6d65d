"""One decoder-only transformer for every architecture of the paper (see config.py).

Attention and MLP math go through one dispatch point each: the registries ``ATTENTION``
and ``MLP_FORWARD``, keyed by ``config.attn_impl`` and ``config.mlp_impl``. A kernel issue
registers its implementation there and the model code stays as it is. The torch references
are ``scaled_dot_product_attention`` and plain matmuls.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcap.models.config import ModelConfig, resolve_impl, under_autocast
from kcap.models.moe import MoE


def torch_attention(q, k, v):
    """Causal attention. q: (B, H, T, Dh); k, v: (B, KV, T, Dh) with KV dividing H."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def triton_attention(q, k, v):
    """kcap.kernels.flash_attention (imported on first use: CPU-only runs never need it)."""
    from kcap.kernels import flash_attention

    return flash_attention(*under_autocast(q, k, v), causal=True)


def torch_mlp(mlp: "MLP", x):
    """x: (..., d) -> (..., d) with the module's weights."""
    if mlp.kind == "gated":
        return mlp.down(F.silu(mlp.gate(x)) * mlp.up(x))
    act = F.gelu if mlp.kind == "gelu" else F.silu
    return mlp.down(act(mlp.up(x)))


def _kernel_mlp(kernel, mlp: "MLP", x):
    gated = mlp.kind == "gated"
    args = under_autocast(x, mlp.up.weight, mlp.down.weight, mlp.gate.weight if gated else None,
                          mlp.up.bias, mlp.down.bias, mlp.gate.bias if gated else None)
    return kernel(*args, act="gelu" if mlp.kind == "gelu" else "silu")


def triton_mlp(mlp: "MLP", x):
    """kcap.kernels.fused_mlp: the activation inside the matmul epilogues."""
    from kcap.kernels import fused_mlp

    return _kernel_mlp(fused_mlp, mlp, x)


def split_mlp(mlp: "MLP", x):
    """kcap.kernels.split_mlp: cuBLAS matmuls around one elementwise activation kernel."""
    from kcap.kernels import split_mlp

    return _kernel_mlp(split_mlp, mlp, x)


# The dispatch points: implementation name -> function.
ATTENTION = {"torch": torch_attention, "triton": triton_attention}
MLP_FORWARD = {"torch": torch_mlp, "triton": triton_mlp, "split": split_mlp}
# What mlp_impl "auto" runs for a dense MLP, on any device: eager cuBLAS, because on an H100
# the epilogue-fused kernel ran at 0.37-0.98x of it at every measured shape, with more memory
# (bench/results/mlp-gpu-2026-11-24.md). "triton" and "split" still select the kernels; MoE
# experts keep "auto" = the grouped GEMM on CUDA (7-8x a loop over experts, moe.py).
DENSE_MLP_AUTO = "torch"


def rotary_tables(context: int, dims: int, base: float):
    """cos, sin of shape (context, dims // 2), float32 (GPT-NeoX rotary)."""
    inv = 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    angles = torch.outer(torch.arange(context, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotate the first 2 * cos.shape[-1] dims of x (B, H, T, Dh) in NeoX halves style."""
    r = 2 * cos.shape[-1]
    if r == 0:
        return x
    T = x.shape[2]
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = rot.float().chunk(2, dim=-1)
    c, s = cos[:T], sin[:T]
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return torch.cat([out, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.d_model, cfg.head_dim
        self.q = nn.Linear(d, cfg.n_head * hd, bias=cfg.bias)
        self.kv = nn.Linear(d, 2 * cfg.kv_heads * hd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * hd, d, bias=cfg.bias)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.q(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, cfg.kv_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = ATTENTION[resolve_impl(cfg.attn_impl, q)](q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class MLP(nn.Module):
    """Standard (gelu/silu: up -> act -> down) or gated (down(silu(gate) * up)) MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.impl = cfg.mlp, cfg.mlp_impl
        d, h = cfg.d_model, cfg.mlp_hidden
        if self.kind == "gated":
            self.gate = nn.Linear(d, h, bias=cfg.bias)
        self.up = nn.Linear(d, h, bias=cfg.bias)
        self.down = nn.Linear(h, d, bias=cfg.bias)

    def forward(self, x):
        impl = DENSE_MLP_AUTO if self.impl == "auto" else resolve_impl(self.impl, x)
        return MLP_FORWARD[impl](self, x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.norm == "layernorm" else (
            lambda: nn.RMSNorm(cfg.d_model, eps=1e-6))
        self.norm1 = norm()
        self.attn = Attention(cfg)
        self.mlp = None
        if cfg.n_experts:
            self.norm2, self.mlp = norm(), MoE(cfg)
        elif cfg.mlp != "none":
            self.norm2, self.mlp = norm(), MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class Transformer(nn.Module):
    """forward(ids (B, T) int64, targets (B, T) or None) -> (logits (B, T, V), loss or None).

    The loss is the mean cross-entropy over targets != -100, plus the MoE auxiliary loss.
    With targets and ``loss_impl`` triton (the default on CUDA) the LM head and the loss are
    one fused kernel (kcap.kernels.linear_cross_entropy) and the logits are never formed:
    forward then returns (None, loss). ``head=False`` returns (h, None) instead: the final
    normed hidden states (B, T, d_model), for a caller that applies the head itself (a
    pack's fused loss, kcap.pack.stacked).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model) if cfg.learned_pos else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = nn.LayerNorm(cfg.d_model) if cfg.norm == "layernorm" else nn.RMSNorm(
            cfg.d_model, eps=1e-6)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.wte.weight
        cos, sin = rotary_tables(cfg.context, cfg.rotary_dims, cfg.rotary_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT2: scale residual projections by depth
            if name.endswith(("proj.weight", "down.weight", "w2")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids, targets=None, *, head: bool = True):
        B, T = ids.shape
        if T > self.cfg.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.cfg.context}")
        x = self.wte(ids)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        h = self.norm_f(x)
        if not head:
            return h, None
        fused = isinstance(self.lm_head, nn.Linear)  # not a quantized head
        if targets is not None and fused and resolve_impl(self.cfg.loss_impl, h) == "triton":
            from kcap.kernels import linear_cross_entropy

            hidden, weight = under_autocast(h, self.lm_head.weight)
            logits = None
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                        targets.reshape(-1), ignore_index=-100)
        else:
            logits = self.lm_head(h)
            if targets is None:
                return logits, None
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
        aux = [b.mlp.aux_loss for b in self.blocks if isinstance(b.mlp, MoE) and b.mlp.aux_loss is not None]
        if aux:
            loss = loss + self.cfg.aux_loss_coef * torch.stack(aux).mean()
        return logits, loss
