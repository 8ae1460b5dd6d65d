"""Mixture-of-experts MLP (GPT2-MoE): E experts of d -> hidden -> d (GELU) replacing the MLP.

Routing goes through ``kcap.models.router.route`` (the C++ router for the device when built,
the torch reference otherwise; rules in router.py). The router is not differentiated: the
gates and the load-balancing loss aux = E * sum_e f_e * P_e (f_e: fraction of assignments
to e, P_e: mean router probability of e) are recomputed here with torch ops from the logits
and the returned indices. The router's z-loss is reported (``last_routing.z_loss``), not
trained on. Dropped assignments contribute nothing (the token's residual stream passes).

Experts follow the config's ``mlp_impl``: "triton" runs the Triton grouped GEMM over the
block-padded permutation (one launch per matmul for all experts), "torch" the plain loop
over experts (the reference), "auto" the first on CUDA tensors and the second elsewhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcap.models.config import resolve_impl, under_autocast
from kcap.models.router import route

BLOCK = 64  # rows per block of the grouped GEMM


class MoE(nn.Module):
    """E experts of d -> hidden -> d (GELU) replacing the MLP; x: (B, T, d) -> (B, T, d).

    Expert weights are stacked (E, ...) tensors, the layout a grouped GEMM wants.
    """

    def __init__(self, cfg):
        super().__init__()
        d, h, E = cfg.d_model, cfg.mlp_hidden, cfg.n_experts
        self.cfg, self.router_impl = cfg, cfg.router_impl
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
        cfg = self.cfg
        factor = cfg.capacity_factor_train if self.training else cfg.capacity_factor_eval
        logits = self.router(x)
        r = route(logits.detach().float().contiguous(), cfg.top_k, factor, BLOCK, self.router_impl)
        self.last_routing = r
        probs = torch.softmax(logits.float(), dim=-1)
        gate = probs.gather(1, r.expert.to(x.device))
        if cfg.top_k > 1:
            gate = gate / gate.sum(-1, keepdim=True)
        self.aux_loss = cfg.n_experts * (r.frac.to(x.device) * probs.mean(0)).sum() if len(x) else None
        if resolve_impl(cfg.mlp_impl, x) == "triton":
            out = self._grouped(x, r, gate)
        else:
            out = self._loop(x, r, gate)
        return out.view(shape)

    def _loop(self, x, r, gate):
        """The reference: one matmul pair per expert over its kept slots."""
        out = torch.zeros_like(x)
        k = self.cfg.top_k
        offsets = r.offsets.tolist()
        perm = r.perm.to(x.device)
        for e in range(self.cfg.n_experts):
            slots = perm[offsets[e]:offsets[e + 1]]
            if slots.numel() == 0:
                continue
            tok, choice = slots // k, slots % k
            h = F.gelu(x[tok] @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]
            out.index_add_(0, tok, h * gate[tok, choice, None].to(h.dtype))
        return out

    def _grouped(self, x, r, gate):
        """All experts at once: gather into the block-padded order, two grouped GEMMs, scatter."""
        from kcap.kernels.grouped_gemm import grouped_linear

        k = self.cfg.top_k
        padded = r.padded_perm.to(x.device)
        blocks = r.block_expert.to(x.device)
        # No boolean indexing (it would wait for the GPU): padding rows (-1) read token 0 and
        # are weighted by zero on the way back.
        valid = (padded >= 0).to(x.dtype)
        slots = padded.clamp(min=0)
        tok, choice = slots // k, slots % k
        xs, w1, b1, w2, b2 = under_autocast(x[tok] * valid[:, None], self.w1, self.b1, self.w2, self.b2)
        h = F.gelu(grouped_linear(xs, w1, b1, blocks, BLOCK))
        y = grouped_linear(h, w2, b2, blocks, BLOCK)
        weight = gate[tok, choice] * valid
        out = torch.zeros_like(x)
        return out.index_add_(0, tok, (y * weight[:, None].to(y.dtype)).to(x.dtype))
