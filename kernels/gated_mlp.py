"""Fused MLPs in Triton: the activation lives in the matmul epilogue, forward and backward.

    fused_mlp(x, w_up, w_down, w_gate=None, b_up=None, b_down=None, b_gate=None, act="silu")

x: (..., K); weights in nn.Linear layout: w_up, w_gate (N, K), w_down (D, N); biases (N,),
(N,), (D,). With ``w_gate`` it is the gated MLP of LLaMA/Mistral,
``down(silu(x Wg^T + bg) * (x Wu^T + bu)) + bd``; without, the standard MLP
``down(act(x Wu^T + bu)) + bd`` with act "gelu" (exact, erf; GPT2) or "silu".

Forward: one Triton GEMM reads each x tile once and multiplies it by the matching gate and up
columns (two accumulators per output tile), adds the biases and writes h = silu(g) * u (or
act(a)) in its epilogue, plus the pre-activations g and u that the backward needs. The down
projection is a cuBLAS matmul. **Choice**: the pre-activations are saved rather than
recomputed in the backward: two (M, N) tensors instead of eager PyTorch's four (g, u, silu(g),
h), and no extra GEMM.

Backward: a second Triton GEMM computes dh = dy W_down and applies the activation's
derivative in its epilogue, writing dg and du directly (and h again, for dW_down); the
weight and input gradients are cuBLAS matmuls. Both ops are ``torch.library`` custom ops
with autograd, so ``torch.compile(fullgraph=True)`` sees no graph break. ``GatedMLP`` is an
nn.Module drop-in (state dict keys gate/up/down like kcap's MLP); ``mlp_reference`` is the
plain PyTorch definition the tests hold the kernels to.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from .runtime import UPCAST as _UPCAST_FLAG
from .runtime import check_device, config, configs, dot_precision

UPCAST = tl.constexpr(_UPCAST_FLAG)
ACTS = ("silu", "gelu")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Epilogue modes of the shared GEMM.
FWD_GATED, FWD_ACT, BWD_GATED, BWD_ACT = 0, 1, 2, 3


@triton.jit
def _act(x, GELU: tl.constexpr):
    if GELU:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x * tl.sigmoid(x)


@triton.jit
def _act_grad(x, GELU: tl.constexpr):
    if GELU:  # d/dx x Phi(x) = Phi(x) + x phi(x)
        return 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476)) + \
            x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


GEMM_CANDIDATES = [config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
                   config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
                   config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
                   config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
                   config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)]
# Trials (KCAP_TRIAL_CANDIDATES=1, kernels/runtime.py): the backward's larger tiles with 8
# warps, which do not spill in the offline sm_90 compile (all 4-warp ones above 64 x 64 do).
GEMM_TRIALS = [config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
               config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)]


@triton.autotune(configs=configs(GEMM_CANDIDATES, GEMM_TRIALS), key=["M", "N", "K", "MODE", "GELU"])
@triton.jit
def _epilogue_gemm(A, B1, B2, BIAS1, BIAS2, P1, P2, OUT, OUT1, OUT2,
                   M, N, K, sam, sak, sb1k, sb1n, sb2k, sb2n,
                   MODE: tl.constexpr, GELU: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, DOT: tl.constexpr):
    """acc1 = A @ B1 (and acc2 = A @ B2 when gated-forward); A: (M, K), B: (K, N) by strides.

    MODE FWD_GATED: g = acc1 + bias1, u = acc2 + bias2 -> OUT = silu(g) * u, OUT1 = g, OUT2 = u
    MODE FWD_ACT:   a = acc1 + bias1 -> OUT = act(a), OUT1 = a
    MODE BWD_GATED: dh = acc1, g = P1, u = P2 -> OUT = silu(g) * u, OUT1 = dg, OUT2 = du
    MODE BWD_ACT:   dh = acc1, a = P1 -> OUT = act(a), OUT1 = da
    Outputs and P1/P2 are contiguous (M, N).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n  # grouped ordering: neighbouring programs share A tiles in L2
    first_m = (pid // group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows_in_group
    pid_n = (pid % group) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(A + offs_m[:, None] * sam + ks[None, :] * sak,
                    mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        b_mask = (ks[:, None] < K) & (offs_n[None, :] < N)
        b1 = tl.load(B1 + ks[:, None] * sb1k + offs_n[None, :] * sb1n, mask=b_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b1 = b1.to(tl.float32)
        acc1 += tl.dot(a, b1, input_precision=DOT)
        if MODE == 0:
            b2 = tl.load(B2 + ks[:, None] * sb2k + offs_n[None, :] * sb2n, mask=b_mask, other=0.0)
            if UPCAST:
                b2 = b2.to(tl.float32)
            acc2 += tl.dot(a, b2, input_precision=DOT)
    tile = offs_m[:, None] * N + offs_n[None, :]
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    dtype = OUT.dtype.element_ty
    if MODE == 0 or MODE == 1:
        if HAS_BIAS:
            acc1 += tl.load(BIAS1 + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            if MODE == 0:
                acc2 += tl.load(BIAS2 + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        # Round the pre-activations to the storage dtype first, so that the forward and the
        # backward (which reads them back) see the same values.
        pre1 = acc1.to(dtype)
        tl.store(OUT1 + tile, pre1, mask=inside)
        if MODE == 0:
            pre2 = acc2.to(dtype)
            tl.store(OUT2 + tile, pre2, mask=inside)
            h = _act(pre1.to(tl.float32), False) * pre2.to(tl.float32)
        else:
            h = _act(pre1.to(tl.float32), GELU)
        tl.store(OUT + tile, h.to(dtype), mask=inside)
    else:
        p1 = tl.load(P1 + tile, mask=inside, other=0.0).to(tl.float32)
        if MODE == 2:
            p2 = tl.load(P2 + tile, mask=inside, other=0.0).to(tl.float32)
            s = _act(p1, False)
            tl.store(OUT + tile, (s * p2).to(dtype), mask=inside)
            tl.store(OUT1 + tile, (acc1 * p2 * _act_grad(p1, False)).to(dtype), mask=inside)
            tl.store(OUT2 + tile, (acc1 * s).to(dtype), mask=inside)
        else:
            tl.store(OUT + tile, _act(p1, GELU).to(dtype), mask=inside)
            tl.store(OUT1 + tile, (acc1 * _act_grad(p1, GELU)).to(dtype), mask=inside)


def _launch(mode, a, b1, b2, bias1, bias2, p1, p2, n, gelu, transpose_b):
    """Run the GEMM; b given in Linear layout (N, K) if transpose_b else as (K, N)."""
    M, K = a.shape
    out = torch.empty((M, n), dtype=a.dtype, device=a.device)
    out1 = torch.empty_like(out)
    out2 = torch.empty_like(out) if mode in (FWD_GATED, BWD_GATED) else out1
    sb1 = (b1.stride(1), b1.stride(0)) if transpose_b else b1.stride()
    sb2 = sb1 if b2 is None else ((b2.stride(1), b2.stride(0)) if transpose_b else b2.stride())
    dummy = out  # unused pointer slots
    _epilogue_gemm[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
        a, b1, dummy if b2 is None else b2, dummy if bias1 is None else bias1,
        dummy if bias2 is None else bias2, dummy if p1 is None else p1,
        dummy if p2 is None else p2, out, out1, out2,
        M, n, K, a.stride(0), a.stride(1), *sb1, *sb2,
        MODE=mode, GELU=gelu, HAS_BIAS=bias1 is not None, DOT=dot_precision(a.dtype))
    return out, out1, out2


# --- ops ----------------------------------------------------------------------------------
@torch.library.custom_op("kcap::fused_mlp_fwd", mutates_args=())
def _mlp_fwd(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, w_gate: torch.Tensor | None,
             b_up: torch.Tensor | None, b_down: torch.Tensor | None, b_gate: torch.Tensor | None,
             act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = w_up.shape[0]
    if w_gate is not None:  # pre-activations: (g, u)
        h, g, u = _launch(FWD_GATED, x, w_gate, w_up, b_gate, b_up, None, None, n, False, True)
    else:  # pre-activation a; the third output is a placeholder
        h, g, _ = _launch(FWD_ACT, x, w_up, None, b_up, None, None, None, n, act == "gelu", True)
        u = x.new_empty(0)
    return torch.nn.functional.linear(h, w_down, b_down), g, u


@_mlp_fwd.register_fake
def _mlp_fwd_fake(x, w_up, w_down, w_gate, b_up, b_down, b_gate, act):
    M, n = x.shape[0], w_up.shape[0]
    u = x.new_empty((M, n)) if w_gate is not None else x.new_empty(0)
    return x.new_empty((M, w_down.shape[0])), x.new_empty((M, n)), u


@torch.library.custom_op("kcap::fused_mlp_bwd", mutates_args=())
def _mlp_bwd(dy: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
             w_gate: torch.Tensor | None, g: torch.Tensor, u: torch.Tensor, act: str,
             has_bias: bool) -> list[torch.Tensor]:
    n = w_up.shape[0]
    dy = dy.contiguous()
    if w_gate is not None:
        h, dg, du = _launch(BWD_GATED, dy, w_down, None, None, None, g, u, n, False, False)
    else:
        h, du, _ = _launch(BWD_ACT, dy, w_down, None, None, None, g, None, n, act == "gelu", False)
        dg = None
    return _input_and_weight_grads(dy, x, w_up, w_gate, h, dg, du, has_bias)


def _input_and_weight_grads(dy, x, w_up, w_gate, h, dg, du, has_bias) -> list[torch.Tensor]:
    """[dx, dW_up, dW_down, (dW_gate), (db_up, db_down, (db_gate))] on cuBLAS, from the
    elementwise gradients dg (None without a gate), du and the hidden h."""
    dx = du @ w_up
    grads = [dx, du.t() @ x, dy.t() @ h]  # dx, dW_up, dW_down
    if dg is not None:
        dx.addmm_(dg, w_gate)
        grads.append(dg.t() @ x)  # dW_gate
    if has_bias:
        grads += [du.sum(0), dy.sum(0)] + ([dg.sum(0)] if dg is not None else [])
    return grads


@_mlp_bwd.register_fake
def _mlp_bwd_fake(dy, x, w_up, w_down, w_gate, g, u, act, has_bias):
    grads = [torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down)]
    if w_gate is not None:
        grads.append(torch.empty_like(w_gate))
    if has_bias:
        grads += [w_up.new_empty(w_up.shape[0]), w_down.new_empty(w_down.shape[0])]
        if w_gate is not None:
            grads.append(w_gate.new_empty(w_gate.shape[0]))
    return grads


def _setup(ctx, inputs, output):
    x, w_up, w_down, w_gate, b_up, b_down, b_gate, act = inputs
    _, g, u = output
    ctx.save_for_backward(x, w_up, w_down, w_gate, g, u)
    ctx.act, ctx.has_bias = act, b_up is not None


def _backward_of(bwd_op):
    """The autograd backward of a forward op whose saved tensors ``_setup`` keeps, through
    ``bwd_op`` (same arguments as _mlp_bwd)."""
    def backward(ctx, dy, _dg, _du):
        x, w_up, w_down, w_gate, g, u = ctx.saved_tensors
        grads = iter(bwd_op(dy, x, w_up, w_down, w_gate, g, u, ctx.act, ctx.has_bias))
        dx, dw_up, dw_down = next(grads), next(grads), next(grads)
        dw_gate = next(grads) if w_gate is not None else None
        db_up = db_down = db_gate = None
        if ctx.has_bias:
            db_up, db_down = next(grads), next(grads)
            db_gate = next(grads) if w_gate is not None else None
        return dx, dw_up, dw_down, dw_gate, db_up, db_down, db_gate, None
    return backward


_mlp_fwd.register_autograd(_backward_of(_mlp_bwd), setup_context=_setup)


# --- public API -------------------------------------------------------------------------------
def _check(x, w_up, w_down, w_gate, b_up, b_down, b_gate, act):
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    named = {"x": x, "w_up": w_up, "w_down": w_down, "w_gate": w_gate, "b_up": b_up,
             "b_down": b_down, "b_gate": b_gate}
    present = {k: t for k, t in named.items() if t is not None}
    for name, t in present.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in DTYPES or any(t.dtype != x.dtype for t in present.values()):
        raise TypeError(f"x and every weight must share one dtype of float16/bfloat16/float32; got "
                        f"{ {k: str(t.dtype) for k, t in present.items()} }")
    check_device(*present.values())
    K = x.shape[-1]
    if w_up.ndim != 2 or w_up.shape[1] != K:
        raise ValueError(f"w_up must be (N, K={K}), got {tuple(w_up.shape)}")
    N = w_up.shape[0]
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate must match w_up {tuple(w_up.shape)}, got {tuple(w_gate.shape)}")
    if w_gate is not None and act != "silu":
        raise ValueError("the gated MLP uses silu")
    if w_down.ndim != 2 or w_down.shape[1] != N:
        raise ValueError(f"w_down must be (D, N={N}), got {tuple(w_down.shape)}")
    if (b_up is None) != (b_down is None) or (w_gate is not None and (b_gate is None) != (b_up is None)):
        raise ValueError("give all biases or none")
    for name, b, n in (("b_up", b_up, N), ("b_gate", b_gate, N), ("b_down", b_down, w_down.shape[0])):
        if b is not None and b.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")


def fused_mlp(x, w_up, w_down, w_gate=None, b_up=None, b_down=None, b_gate=None, act="silu"):
    """The MLP of the module docstring. x: (..., K) -> (..., D) in x's dtype."""
    _check(x, w_up, w_down, w_gate, b_up, b_down, b_gate, act)
    lead = x.shape[:-1]
    y, _, _ = _mlp_fwd(x.reshape(-1, x.shape[-1]), w_up, w_down, w_gate, b_up, b_down, b_gate, act)
    return y.view(*lead, w_down.shape[0])


def mlp_reference(x, w_up, w_down, w_gate=None, b_up=None, b_down=None, b_gate=None, act="silu"):
    """Plain PyTorch: the same computation as fused_mlp, unfused."""
    F = torch.nn.functional
    a = F.linear(x, w_up, b_up)
    if w_gate is not None:
        h = F.silu(F.linear(x, w_gate, b_gate)) * a
    else:
        h = F.gelu(a) if act == "gelu" else F.silu(a)
    return F.linear(h, w_down, b_down)


class GatedMLP(nn.Module):
    """LLaMA-style MLP on the fused kernels: down(silu(gate(x)) * up(x)).

    State dict keys gate.weight, up.weight, down.weight (and biases if ``bias``), as in
    kcap's reference MLP, so either module loads the other's weights.
    """

    def __init__(self, dim: int, hidden: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate, self.up, self.down = nn.Linear(dim, hidden, **kw), nn.Linear(dim, hidden, **kw), \
            nn.Linear(hidden, dim, **kw)

    def forward(self, x):
        return fused_mlp(x, self.up.weight, self.down.weight, self.gate.weight, self.up.bias,
                         self.down.bias, self.gate.bias, act="silu")
