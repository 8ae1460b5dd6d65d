"""LoRA adapters as a module swap (the first piece of the QA evaluation, issue 15).

Part 3.1 of the paper fine-tunes a pretrained model on question/answer pairs with LoRA:
low-rank updates on the attention's query and value projections and on the MLP, the rest
frozen, so what the model can answer comes from what pretraining stored. ``add_lora`` swaps
those nn.Linear layers of a kcap Transformer for ``LoRALinear``:

    y = base(x) + (alpha / rank) * (x A^T) B^T        A: (rank, in), B: (rows, rank)

B starts at zero, so a fresh adapter changes nothing; only A and B train. kcap computes keys
and values with one matrix (``attn.kv``): its adapter covers the value rows only, so the
adapted projections are exactly the paper's (query, value, MLP).

``merge_lora`` folds the updates into the base weights (for evaluation at full speed) and
``unmerge_lora`` restores the base weights exactly (they are kept aside while merged).
Over a quantized model (kcap.quantize.QuantLinear layers) the adapters train in fp32 beside
the integer weights, as QLoRA does, and are never merged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

WHERE = ("q", "v", "mlp")


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update on its output rows [start, stop) (all rows by
    default). x: (..., in) -> (..., out) in the base layer's dtype."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, rows: tuple[int, int] | None = None):
        super().__init__()
        quantized = hasattr(base, "dequantized")  # kcap.quantize.QuantLinear: QLoRA-style
        if not (isinstance(base, nn.Linear) or quantized):
            raise TypeError(f"base must be an nn.Linear or a QuantLinear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
            raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
        start, stop = rows if rows is not None else (0, base.out_features)
        if not 0 <= start < stop <= base.out_features:
            raise ValueError(f"rows must lie in [0, {base.out_features}], got {(start, stop)}")
        self.base, self.rank, self.scale = base, rank, alpha / rank
        self.start, self.stop = start, stop
        w = base.qweight if quantized else base.weight  # adapters train in fp32 over int weights
        dtype = torch.float32 if quantized else w.dtype
        self.a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.b = nn.Parameter(torch.zeros(stop - start, rank, device=w.device, dtype=dtype))
        self._kept: torch.Tensor | None = None  # the base weight while merged

    @property
    def merged(self) -> bool:
        return self._kept is not None

    def delta_weight(self) -> torch.Tensor:
        """The update to the base weight, (out, in): zero outside the adapted rows."""
        delta = torch.zeros(self.base.out_features, self.base.in_features, dtype=self.a.dtype,
                            device=self.a.device)
        delta[self.start:self.stop] = self.scale * (self.b @ self.a)
        return delta

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        d = (x.to(self.a.dtype) @ self.a.t()) @ self.b.t() * self.scale
        if (self.start, self.stop) == (0, self.base.out_features):
            return y + d.to(y.dtype)
        return torch.cat([y[..., :self.start], y[..., self.start:self.stop] + d.to(y.dtype),
                          y[..., self.stop:]], dim=-1)

    @torch.no_grad()
    def merge(self) -> None:
        if not isinstance(self.base, nn.Linear):
            raise ValueError("merge needs a floating-point base layer; over a quantized one the "
                             "adapter stays apart (its forward adds it)")
        if not self.merged:
            self._kept = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.copy_(self._kept)
            self._kept = None


def add_lora(model, rank: int = 16, alpha: float = 32.0, where=WHERE) -> list[str]:
    """Swap the ``where`` projections of every block of a kcap Transformer for LoRALinear
    and freeze everything else; return the adapted modules' names.

    ``where``: any of "q" (attention query), "v" (the value rows of ``attn.kv``), "mlp" (its
    up, down and gate). Adapted MLPs run the plain torch path: the fused Triton MLP reads its
    weights directly and would skip the adapters.
    """
    where = tuple(where)
    unknown = set(where) - set(WHERE)
    if unknown or not where:
        raise ValueError(f"where must be a non-empty subset of {WHERE}, got {where}")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"model must be a kcap Transformer, got {type(model).__name__}")
    if adapters(model):
        raise ValueError("the model already has LoRA adapters")
    if "mlp" in where and model.cfg.n_experts:
        raise ValueError("LoRA on MoE experts is not supported (they are stacked tensors, not "
                         "linear layers); use where=('q', 'v')")
    for p in model.parameters():
        p.requires_grad_(False)
    cfg, names = model.cfg, []
    kv_rows = cfg.kv_heads * cfg.head_dim  # attn.kv's output: keys, then values
    for i, block in enumerate(blocks):
        swaps = []
        if "q" in where:
            swaps.append((block.attn, "q", None))
        if "v" in where:
            swaps.append((block.attn, "kv", (kv_rows, 2 * kv_rows)))
        if "mlp" in where and block.mlp is not None:
            block.mlp.impl = "torch"
            swaps += [(block.mlp, n, None) for n in ("gate", "up", "down") if hasattr(block.mlp, n)]
        for parent, name, rows in swaps:
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, rows))
            names.append(f"blocks.{i}.{'attn' if parent is block.attn else 'mlp'}.{name}")
    return names


def adapters(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(model) -> list[nn.Parameter]:
    """The trainable parameters: every adapter's A and B."""
    return [p for m in adapters(model) for p in (m.a, m.b)]


def merge_lora(model) -> None:
    for m in adapters(model):
        m.merge()


def unmerge_lora(model) -> None:
    for m in adapters(model):
        m.unmerge()
