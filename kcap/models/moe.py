"""Mixture-of-experts MLP (GPT2-MoE) behind a router interface.

``route(logits, k, capacity_factor)`` returns a ``Routing``; this file holds the plain torch
router, the reference that the C++ router issue must match. Rules:
- probabilities: softmax over all experts in fp32; top-k by probability, ties to the lower
  expert id (a stable sort);
- gate weights: the top-k probabilities renormalised to sum to 1 when k > 1; with k = 1 the
  raw probability (Switch Transformer), since a renormalised single gate is always 1 and the
  router would get no gradient from the language-model loss;
- capacity = ceil(capacity_factor * T * k / E) slots per expert; slots are filled in order
  of (choice rank, token index): every token's first choice before any second choice;
  assignments beyond capacity are dropped (the token's residual stream passes unchanged);
- load balancing: aux = E * sum_e f_e * P_e (f_e: fraction of assignments to e, P_e: mean
  router probability of e); z-loss = mean(logsumexp(logits)^2) is reported too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcap.models.config import resolve_impl


@dataclass
class Routing:
    expert: torch.Tensor     # (T, k) int64 expert of each choice
    gate: torch.Tensor       # (T, k) float32 gate weight (differentiable w.r.t. logits)
    keep: torch.Tensor       # (T, k) bool, False where dropped by capacity
    position: torch.Tensor   # (T, k) int64 slot inside the expert
    counts: torch.Tensor     # (E,) int64 assignments kept per expert
    capacity: int
    aux_loss: torch.Tensor   # scalar
    z_loss: torch.Tensor     # scalar


def torch_route(logits: torch.Tensor, k: int, capacity_factor: float) -> Routing:
    """Route T tokens given router logits (T, E)."""
    if logits.ndim != 2:
        raise ValueError(f"router logits must be (T, E), got shape {tuple(logits.shape)}")
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")
    probs = torch.softmax(logits.float(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]
    top = probs.gather(-1, order)
    gate = top / top.sum(-1, keepdim=True) if k > 1 else top
    capacity = math.ceil(capacity_factor * T * k / E)
    flat = order.t().reshape(-1)  # choice-rank major, then token order
    one_hot = F.one_hot(flat, E)
    position = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1).view(k, T).t()
    keep = position < capacity
    counts = torch.bincount(order[keep], minlength=E)
    frac = one_hot.float().mean(0) if T else torch.zeros(E, device=logits.device)
    aux = E * (frac * probs.mean(0)).sum() if T else logits.new_zeros(())
    z = torch.logsumexp(logits.float(), -1).pow(2).mean() if T else logits.new_zeros(())
    return Routing(order, gate, keep, position, counts, capacity, aux, z)


ROUTERS = {"torch": torch_route}


class MoE(nn.Module):
    """E experts of d -> hidden -> d (GELU) replacing the MLP; x: (B, T, d) -> (B, T, d).

    Expert weights are stacked (E, ...) tensors, the layout a grouped GEMM wants.
    """

    def __init__(self, cfg, router: str = "torch"):
        super().__init__()
        d, h, E = cfg.d_model, cfg.mlp_hidden, cfg.n_experts
        self.cfg, self.router_impl = cfg, router
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, d, h) * cfg.init_std)
        self.b1 = nn.Parameter(torch.zeros(E, h))
        self.w2 = nn.Parameter(torch.randn(E, h, d) * cfg.init_std / math.sqrt(2 * cfg.n_layer))
        self.b2 = nn.Parameter(torch.zeros(E, d))
        self.aux_loss = None
        self.last_routing = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        factor = self.cfg.capacity_factor_train if self.training else self.cfg.capacity_factor_eval
        r = ROUTERS[self.router_impl](self.router(x), self.cfg.top_k, factor)
        self.aux_loss, self.last_routing = r.aux_loss, r
        out = torch.zeros_like(x)
        fused = resolve_impl(self.cfg.mlp_impl, x) == "triton"
        for e in range(self.cfg.n_experts):  # the plain loop the grouped GEMM will replace
            tok, choice = torch.nonzero((r.expert == e) & r.keep, as_tuple=True)
            if tok.numel() == 0:
                continue
            if fused:  # the fused GELU MLP, weights viewed in nn.Linear layout
                from kcap.kernels import fused_mlp
                h = fused_mlp(x[tok], self.w1[e].t(), self.w2[e].t(), b_up=self.b1[e],
                              b_down=self.b2[e], act="gelu")
            else:
                h = F.gelu(x[tok] @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]
            out.index_add_(0, tok, h * r.gate[tok, choice, None].to(h.dtype))
        return out.view(shape)
