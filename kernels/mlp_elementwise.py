"""The MLP as cuBLAS GEMMs around one fused elementwise kernel (Liger's SwiGLU design).

    split_mlp(x, w_up, w_down, w_gate=None, b_up=None, b_down=None, b_gate=None, act="silu")

The same computation and arguments as ``gated_mlp.fused_mlp``, built the other way round:
instead of putting the activation into a Triton GEMM's epilogue, every GEMM is cuBLAS and
one Triton kernel does the elementwise work, reading the pre-activations once:

- forward: g = x Wg^T + bg and u = x Wu^T + bu (cuBLAS, stored in x's dtype), then the
  kernel writes h = silu(g) * u (or act(a) without a gate), then y = h Wd^T + bd (cuBLAS).
- backward: dh = dy Wd (cuBLAS, stored in x's dtype), then the kernel writes dg, du and
  h again (for dWd) from dh, g and u in one pass, then cuBLAS for dx and the weight
  gradients, exactly as fused_mlp's backward.

Why both exist (issue 16): at the paper's widths a Triton GEMM does not beat cuBLAS, so the
epilogue fusion may lose more in its GEMMs than it saves in memory traffic; this one keeps
cuBLAS's GEMMs and still saves eager PyTorch's separate silu, multiply and their backward
(two (M, N) tensors saved instead of four). ``python -m bench mlp`` measures the two side by
side. Rounding differs from fused_mlp in one place only: dh is stored in x's dtype before
the elementwise kernel reads it (fused_mlp keeps it in fp32 inside its epilogue).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gated_mlp import (_act, _act_grad, _backward_of, _check, _input_and_weight_grads,
                        _mlp_bwd_fake, _mlp_fwd_fake, _setup)
from .runtime import vmapped_first

BLOCK = 1024


@triton.jit
def _activation(G, U, DH, H, DG, DU, n, GATED: tl.constexpr, GELU: tl.constexpr,
                BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise over n values (contiguous tensors of one shape).

    forward:  H = silu(G) * U (GATED) or act(G) (G holds the pre-activation a)
    backward: also DG = DH * U * silu'(G) and DU = DH * silu(G) (GATED), or DU = DH * act'(G)
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dtype = H.dtype.element_ty
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        s = _act(g, False)
        tl.store(H + offs, (s * u).to(dtype), mask=mask)
        if BACKWARD:
            dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DG + offs, (dh * u * _act_grad(g, False)).to(dtype), mask=mask)
            tl.store(DU + offs, (dh * s).to(dtype), mask=mask)
    else:
        tl.store(H + offs, _act(g, GELU).to(dtype), mask=mask)
        if BACKWARD:
            dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DU + offs, (dh * _act_grad(g, GELU)).to(dtype), mask=mask)


def _run(g, u, dh, gelu):
    """(h, dg, du) from contiguous (M, N) tensors; u None without a gate, dh None forward."""
    h = torch.empty_like(g)
    dg = torch.empty_like(g) if dh is not None and u is not None else h
    du = torch.empty_like(g) if dh is not None else h
    n = g.numel()
    _activation[(triton.cdiv(n, BLOCK),)](g, g if u is None else u, g if dh is None else dh, h, dg, du,
                                          n, GATED=u is not None, GELU=gelu,
                                          BACKWARD=dh is not None, BLOCK=BLOCK)
    return h, (dg if dh is not None and u is not None else None), (du if dh is not None else None)


@torch.library.custom_op("kcap::split_mlp_fwd", mutates_args=())
def _fwd(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, w_gate: torch.Tensor | None,
         b_up: torch.Tensor | None, b_down: torch.Tensor | None, b_gate: torch.Tensor | None,
         act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    F = torch.nn.functional
    u = F.linear(x, w_up, b_up)
    if w_gate is not None:  # saved: (g, u)
        g = F.linear(x, w_gate, b_gate)
        h, _, _ = _run(g, u, None, False)
    else:  # saved: (a, placeholder)
        g, u = u, x.new_empty(0)
        h, _, _ = _run(g, None, None, act == "gelu")
    return F.linear(h, w_down, b_down), g, u


_fwd.register_fake(_mlp_fwd_fake)  # the same outputs as fused_mlp's forward


@torch.library.custom_op("kcap::split_mlp_bwd", mutates_args=())
def _bwd(dy: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
         w_gate: torch.Tensor | None, g: torch.Tensor, u: torch.Tensor, act: str,
         has_bias: bool) -> list[torch.Tensor]:
    dy = dy.contiguous()
    dh = dy @ w_down
    h, dg, du = _run(g, u if w_gate is not None else None, dh, act == "gelu")
    return _input_and_weight_grads(dy, x, w_up, w_gate, h, dg, du, has_bias)


_bwd.register_fake(_mlp_bwd_fake)
_fwd.register_autograd(_backward_of(_bwd), setup_context=_setup)


# --- vmap (a pack's models, kcap.pack): batched cuBLAS GEMMs, one elementwise launch --------
# Under vmap, autograd records the ops a vmap rule calls, not the op it stands for: the rule
# below is therefore built of differentiable pieces, torch.bmm for the GEMMs and the
# elementwise kernel as an op of its own (with its backward kernel), over all models at once.
@torch.library.custom_op("kcap::mlp_activation", mutates_args=())
def _activation_op(g: torch.Tensor, u: torch.Tensor | None, act: str) -> torch.Tensor:
    """h = silu(g) * u, or act(g) when u is None; contiguous (R, N) in, (R, N) out."""
    return _run(g, u, None, act == "gelu")[0]


@_activation_op.register_fake
def _activation_fake(g, u, act):
    return torch.empty_like(g)


def _activation_setup(ctx, inputs, output):
    g, u, act = inputs
    ctx.save_for_backward(g, u)
    ctx.act = act


def _activation_backward(ctx, dh):
    g, u = ctx.saved_tensors
    _, dg, du = _run(g, u, dh.contiguous(), ctx.act == "gelu")
    return (dg, du, None) if u is not None else (du, None, None)  # ungated: du is d(act input)


_activation_op.register_autograd(_activation_backward, setup_context=_activation_setup)


def _linear(x, w, b):
    """Per model x @ w^T + b: (n, R, K), (n, N, K), (n, N) or None -> (n, R, N)."""
    y = torch.bmm(x, w.transpose(1, 2))
    return y if b is None else y + b.unsqueeze(1)


@_fwd.register_vmap
def _fwd_vmap(info, in_dims, x, w_up, w_down, w_gate, b_up, b_down, b_gate, act):
    n = info.batch_size
    args = (x, w_up, w_down, w_gate, b_up, b_down, b_gate)
    x, w_up, w_down, w_gate, b_up, b_down, b_gate = (
        vmapped_first(t, d, n) for t, d in zip(args, in_dims))
    u = _linear(x, w_up, b_up)
    g = _linear(x, w_gate, b_gate) if w_gate is not None else u
    rows = (-1, u.shape[-1])  # the n models' rows as one launch
    h = _activation_op(g.reshape(rows).contiguous(),
                       u.reshape(rows).contiguous() if w_gate is not None else None, act)
    saved_u = u if w_gate is not None else x.new_empty((n, 0))  # split's outputs (unused here)
    return (_linear(h.view(u.shape), w_down, b_down), g, saved_u), (0, 0, 0)


def split_mlp(x, w_up, w_down, w_gate=None, b_up=None, b_down=None, b_gate=None, act="silu"):
    """The MLP of gated_mlp's docstring on cuBLAS GEMMs and one elementwise kernel.
    x: (..., K) -> (..., D) in x's dtype."""
    _check(x, w_up, w_down, w_gate, b_up, b_down, b_gate, act)
    lead = x.shape[:-1]
    y, _, _ = _fwd(x.reshape(-1, x.shape[-1]).contiguous(), w_up, w_down, w_gate, b_up, b_down,
                   b_gate, act)
    return y.view(*lead, w_down.shape[0])
