"""A pack: M solo Transformers of one config as one module, weights stacked on a leading dim.

Why: the paper's models are tiny (0.2M-3M counted parameters) and one of them cannot fill
a GPU (the gpt2-4-4 demo used ~3% of an H100's bf16 peak). Training many models as one
wider computation is the measured fix (HFTA fused identical operators of many models, up
to 15x throughput). Here every layer of the M models runs as one batched operation: the
model's own forward is vmapped (torch.func.vmap over functional_call) over stacked
weights, so linear layers become batched matmuls and the pack cannot drift from the solo
Transformer's code.

What equals the solo computation (fp32, CPU):
  * the math: model i's logits and loss are the solo model's on ids[i] and targets[i]
    (the loss is the mean over non-ignored targets, 0 with no gradient when all are -100);
  * bit for bit, as measured by tests/pack: embeddings, norms, rotary, attention (the model
    dim is folded into the batch of one SDPA call, rows are computed alike) and the logits
    (CPU bmm per model gives mm's bits); BLAS does not promise this, so it is not relied on.
Only equal up to rounding (fp32 reassociation): the loss (per-token losses summed per model
vs. nll_loss's own sum: a few ulps) and the gradients (weight gradients are reductions over
B*T rows done by batched GEMMs, over the padded batch). GPU kernels (bmm vs mm, bf16) are
only ever equal up to rounding.

Kernels: attention runs as the config says (attn_impl: on CUDA by default kcap's Triton
flash attention, whose vmap rule folds the models into the batch: one launch over M * B
rows; the torch path's SDPA calls are folded the same way by ``_FoldedAttention``, since
PyTorch has no batch rule for the CPU SDPA kernel). The loss: the fused LM head +
cross-entropy per model where the config's loss_impl resolves to triton (``forward``). The
MLP: mlp_impl "split" runs as batched cuBLAS GEMMs around one elementwise launch over all
models (split_mlp's vmap rule); "triton" (the epilogue-fused MLP, whose Triton GEMMs read
one model's weights) takes the torch path in a pack, as "auto" and "torch" do everywhere
(transformer.DENSE_MLP_AUTO). MoE models
are refused: the C++ router is not batched over models.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from kcap.models.config import ModelConfig, resolve_impl, under_autocast
from kcap.models.transformer import Transformer

_sdpa = F.scaled_dot_product_attention  # what the folded call runs (a name tests can wrap)


class _FoldedAttention(torch.autograd.Function):
    """SDPA whose vmap rule folds the vmapped (model) dim into the batch: one call over
    (M * B, H, T, Dh). Only ever applied under vmap: the rule calls SDPA on the plain
    tensors, so autograd records SDPA itself and this Function's backward never runs."""

    @staticmethod
    def forward(q, k, v, options):
        return _sdpa(q, k, v, **options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the vmap rule leaves nothing to differentiate
        raise RuntimeError("_FoldedAttention is only used under vmap")

    @staticmethod
    def vmap(info, in_dims, q, k, v, options):
        n = info.batch_size

        def fold(x, dim):
            x = x.movedim(dim, 0) if dim is not None else x.expand(n, *x.shape)
            return x.reshape(n * x.shape[1], *x.shape[2:])

        out = _sdpa(fold(q, in_dims[0]), fold(k, in_dims[1]), fold(v, in_dims[2]), **options)
        return out.view(n, -1, *out.shape[1:]), 0


class _FoldAttention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention to _FoldedAttention while the pack runs (a
    thread-local mode, so solo models elsewhere are untouched)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plain = len(args) == 3 and not any(map(torch.is_tensor, kwargs.values()))  # q, k, v only
        if func is F.scaled_dot_product_attention and plain:
            return _FoldedAttention.apply(*args, kwargs)
        return func(*args, **kwargs)


def decayed(solo_ndim: int) -> bool:
    """Whether the solo trainer decays a parameter of this ndim (kcap.train._optimizer:
    matrices and embeddings, not biases and norm gains)."""
    return solo_ndim >= 2


def _key(name: str) -> str:
    """A solo buffer name as a module attribute ('.' is not allowed there)."""
    return name.replace(".", "-")


def _config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
            for f in dataclasses.fields(ModelConfig) if getattr(a, f.name) != getattr(b, f.name)]


class StackedModels(nn.Module):
    """M Transformers of one ModelConfig, trained as one module.

    Parameters: one ``self.flat`` (M, P) parameter holds every model's weights, model i's in
    row i. Each solo parameter is a block of columns, viewed as (M, *solo shape) by
    ``named_stacked()``; the blocks are laid out in the solo optimizer's order (decayed
    tensors first, ``decayed``) so that StackedAdamW steps the whole pack
    in a handful of elementwise ops over ``flat`` and one slice for the decay, instead of
    ~10 ops per tensor (kernel launches are what tiny models pay for on a GPU). A tied LM
    head stays tied: it is the embedding's block (the solo model's named_parameters()
    deduplication, which is also the solo optimizer's).
    """

    def __init__(self, models: Sequence[Transformer]):
        super().__init__()
        models = list(models) if isinstance(models, (list, tuple)) else models
        if not isinstance(models, list) or not models:
            raise TypeError("StackedModels needs a non-empty list of Transformers, got "
                            f"{type(models).__name__}")
        for i, m in enumerate(models):
            if not isinstance(m, Transformer):
                raise TypeError(f"model {i} is a {type(m).__name__}, not a kcap Transformer")
        cfg = models[0].cfg
        for i, m in enumerate(models[1:], 1):
            diff = _config_differences(cfg, m.cfg)
            if diff:
                raise ValueError(f"a pack needs one ModelConfig; model {i} differs from model 0 in "
                                 + "; ".join(diff))
        if cfg.n_experts:
            raise ValueError("MoE models cannot be packed: the C++ router (kcap.models.router) "
                             "is not batched over models")
        template = models[0]
        params = dict(template.named_parameters(remove_duplicate=False))
        extra = set(template.state_dict()) - set(params)
        if extra:
            raise ValueError(f"persistent buffers are not supported in a pack: {sorted(extra)}")
        places = {(p.device, p.dtype) for m in models for p in m.parameters()}
        if len(places) != 1:
            raise ValueError("all models must be on one device with one dtype, got "
                             f"{sorted(map(str, places))}")

        self.cfg = cfg
        self.m = len(models)
        self.names = [n for n, _ in template.named_parameters()]  # deduplicated: the solo order
        canonical = {id(p): n for n, p in template.named_parameters()}
        # state_dict key -> stacked parameter name (a tied head maps to the embedding)
        self.aliases = {n: canonical[id(p)] for n, p in params.items()}
        self.state_keys = list(template.state_dict())
        self.shapes = {n: tuple(p.shape) for n, p in template.named_parameters()}
        # flat layout: decayed blocks first (solo order within each group), then the others
        self.layout = ([n for n in self.names if decayed(len(self.shapes[n]))]
                       + [n for n in self.names if not decayed(len(self.shapes[n]))])
        self.sizes = [math.prod(self.shapes[n]) for n in self.layout]
        with torch.no_grad():
            solo = [dict(m.named_parameters()) for m in models]
            self.flat = nn.Parameter(torch.cat(
                [torch.stack([s[n].detach().reshape(-1) for s in solo]) for n in self.layout], 1))
        # rotary tables: non-persistent, determined by the config, so model 0's serve all
        self.buffer_names = [n for n, _ in template.named_buffers()]
        for n, b in template.named_buffers():
            self.register_buffer(_key(n), b.detach().clone(), persistent=False)
        with torch.device("meta"):  # the code the pack runs; its weights are ours, passed in
            mlp = "split" if cfg.mlp_impl == "split" else "torch"  # the MLPs with a vmap rule
            base = Transformer(dataclasses.replace(cfg, mlp_impl=mlp))
        object.__setattr__(self, "_base", base)  # not a submodule: .to() must not move meta

    def _blocks(self, flat: torch.Tensor) -> dict:
        """{solo name: (M, *solo shape) view of an (M, P) tensor laid out as ``flat``}, by one
        split (whose backward is one concatenation into flat's gradient, not one full-size
        gradient per block)."""
        return {n: block.view(self.m, *self.shapes[n])
                for n, block in zip(self.layout, flat.split(self.sizes, dim=1))}

    @classmethod
    def from_models(cls, models: Sequence[Transformer]) -> "StackedModels":
        """The pack of ``models`` (copies of their weights, in that order)."""
        return cls(models)

    def named_stacked(self):
        """(solo parameter name, (M, *solo shape) view of ``flat``) in the solo model's order;
        detached views (no autograd), so writes under no_grad change the pack's weights."""
        blocks = self._blocks(self.flat.detach())
        return [(n, blocks[n]) for n in self.names]

    def named_grads(self):
        """(solo parameter name, (M, *solo shape) view of ``flat.grad``) in the solo model's
        order, or [] before a backward."""
        if self.flat.grad is None:
            return []
        blocks = self._blocks(self.flat.grad)
        return [(n, blocks[n]) for n in self.names]

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None):
        """ids (M, B, T) int64 -> (logits (M, B, T, V) in the weights' dtype, losses (M,)
        float32 or None).

        targets (M, B, T) int64, -100 ignored: losses[i] is model i's mean cross-entropy
        over its non-ignored targets (0, with zero gradient, when it has none). Backward on
        ``losses.sum()`` gives every model the gradient it would get alone. With targets
        and the config's ``loss_impl`` resolving to triton (the default on CUDA, as in the
        solo model) the models' LM heads and losses are the fused kernel
        (kcap.kernels.stacked_linear_cross_entropy, one call for all M): the logits are
        never formed and come back as None.
        """
        self._check_tokens(ids, "ids")
        if targets is not None:
            self._check_tokens(targets, "targets")
            if targets.shape != ids.shape:
                raise ValueError(f"targets must have the shape of ids {tuple(ids.shape)}, "
                                 f"got {tuple(targets.shape)}")
        params = self._blocks(self.flat)
        buffers = {n: getattr(self, _key(n)) for n in self.buffer_names}
        fused = targets is not None and resolve_impl(self.cfg.loss_impl, ids) == "triton"

        def one(p, x):
            return functional_call(self._base, (p, buffers), (x,), {"head": not fused})[0]

        with _FoldAttention():
            out = vmap(one)(params, ids)  # logits (M, B, T, V), or hidden states (M, B, T, d)
        if fused:
            return None, self._fused_losses(out, params[self.aliases["lm_head.weight"]], targets)
        if targets is None:
            return out, None
        # per-token losses in one call (ignored tokens give 0), summed per model
        tokens = F.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1),
                                 ignore_index=-100, reduction="none")
        counts = (targets != -100).reshape(self.m, -1).sum(1).clamp(min=1)
        return out, tokens.view(self.m, -1).sum(1) / counts

    def _fused_losses(self, hidden, head, targets) -> torch.Tensor:
        """(M,) losses from hidden states (M, B, T, d) and head weights (M, V, d): the fused
        kernel on every model's B * T rows at once, in the launches of one model (it gives
        0 with zero gradients for a model whose targets are all ignored)."""
        from kcap.kernels import stacked_linear_cross_entropy

        x, w = under_autocast(hidden.reshape(self.m, -1, hidden.shape[-1]), head)
        return stacked_linear_cross_entropy(x, w, targets.reshape(self.m, -1), ignore_index=-100)

    def _check_tokens(self, x, what: str) -> None:
        if not torch.is_tensor(x) or x.dtype != torch.int64:
            raise TypeError(f"{what} must be an int64 tensor, got "
                            f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
        if x.ndim != 3 or x.shape[0] != self.m:
            raise ValueError(f"{what} must have shape (M={self.m}, B, T), got {tuple(x.shape)}")
        if x.shape[2] > self.cfg.context:
            raise ValueError(f"sequence length {x.shape[2]} exceeds the models' context {self.cfg.context}")

    def unstack(self) -> list[dict]:
        """Each model's state_dict in the solo Transformer's format: its keys, in its order,
        shapes and dtype; a tied head is the same tensor as the embedding, as in the solo
        state_dict. Tensors are copies (on the pack's device)."""
        states = []
        with torch.no_grad():
            blocks = self._blocks(self.flat.detach())
            for i in range(self.m):
                own = {n: blocks[n][i].clone() for n in self.names}
                states.append({k: own[self.aliases[k]] for k in self.state_keys})
        return states

    def load_states(self, states: Sequence[dict]) -> None:
        """Load M solo state_dicts (as Transformer.state_dict() gives them) into the pack."""
        if not isinstance(states, (list, tuple)) or len(states) != self.m:
            raise ValueError(f"load_states needs a list of {self.m} state_dicts, got "
                             f"{len(states) if isinstance(states, (list, tuple)) else type(states).__name__}")
        for i, sd in enumerate(states):
            missing, unexpected = set(self.state_keys) - set(sd), set(sd) - set(self.state_keys)
            if missing or unexpected:
                raise ValueError(f"state {i}: missing keys {sorted(missing)}, "
                                 f"unexpected keys {sorted(unexpected)}")
            for k in self.state_keys:
                want = self.shapes[self.aliases[k]]
                if tuple(sd[k].shape) != tuple(want):
                    raise ValueError(f"state {i}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(want)}")
                if self.aliases[k] != k and not torch.equal(sd[k], sd[self.aliases[k]]):
                    raise ValueError(f"state {i}: {k} must equal {self.aliases[k]} (tied weights)")
        blocks = self._blocks(self.flat.detach())
        with torch.no_grad():
            for i, sd in enumerate(states):
                for n in self.names:
                    blocks[n][i].copy_(sd[n])
