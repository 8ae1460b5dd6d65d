"""Grouped GEMM for mixture-of-experts layers (MegaBlocks / vLLM style), forward and backward.

    grouped_linear(x, weight, bias, block_expert, block) -> y

x: (P, K) rows already permuted so that every run of ``block`` rows belongs to one expert
(P = n_blocks * block, padding rows anywhere inside a run); block_expert: (n_blocks,) int64
expert of each run, non-decreasing, with -1 for unused trailing blocks (whose output rows
are zero); weight: (E, K, N); bias: (E, N) or None. y[r] = x[r] @ weight[e] + bias[e]
with e = block_expert[r // block]. One program per (row block, column tile) reads its
expert's weight tile: no per-expert launches, no host synchronisation.

Backward: dx is the same grouped GEMM against weight transposed (strides only); dweight[e]
= x_e^T dy_e accumulates over the rows of expert e's runs (one program per expert and
weight tile; runs of one expert are contiguous, located by the prefix sums of blocks per
expert); dbias by index_add. A ``torch.library`` custom op with autograd;
``grouped_linear_reference`` loops over experts in plain PyTorch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import UPCAST as _UPCAST_FLAG
from .runtime import check_device, config, configs, dot_precision

UPCAST = tl.constexpr(_UPCAST_FLAG)


# Autotuning candidates (tests/kernels check each one alone against the reference).
MM_CANDIDATES = [config(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
                 config(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                 config(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)]
WGRAD_CANDIDATES = [config(BLOCK_K=32, BLOCK_N=64, num_warps=4, num_stages=3),
                    config(BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=3),
                    config(BLOCK_K=64, BLOCK_N=128, num_warps=8, num_stages=3)]


@triton.autotune(configs=configs(MM_CANDIDATES), key=["N", "K", "BLOCK_M"])
@triton.jit
def _grouped_mm(X, W, BIAS, BLOCK_EXPERT, Y, N, K, sxm, sxk, swe, swk, swn, sbe, sym, syn,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + pid_b)
    live = e >= 0  # -1: an unused block of a maximum-size layout; its rows are written as 0
    e = tl.maximum(e, 0)
    rows = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(X + rows[:, None] * sxm + ks[None, :] * sxk, mask=ks[None, :] < K, other=0.0)
        w = tl.load(W + e * swe + ks[:, None] * swk + cols[None, :] * swn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, w, input_precision=DOT)
    if HAS_BIAS:
        acc += tl.load(BIAS + e * sbe + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(live, acc, 0.0)
    tl.store(Y + rows[:, None] * sym + cols[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=cols[None, :] < N)


@triton.autotune(configs=configs(WGRAD_CANDIDATES), key=["N", "K", "BLOCK_M"])
@triton.jit
def _grouped_wgrad(X, DY, SEG, DW, N, K, sxm, sxk, sym, syn, swe, swk, swn,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT: tl.constexpr):
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(SEG + e)
    end = tl.load(SEG + e + 1)
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        x = tl.load(X + rows[:, None] * sxm + ks[None, :] * sxk, mask=ks[None, :] < K, other=0.0)
        dy = tl.load(DY + rows[:, None] * sym + cols[None, :] * syn, mask=cols[None, :] < N, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            dy = dy.to(tl.float32)
        acc += tl.dot(tl.trans(x), dy, input_precision=DOT)
    tl.store(DW + e * swe + ks[:, None] * swk + cols[None, :] * swn, acc.to(DW.dtype.element_ty),
             mask=(ks[:, None] < K) & (cols[None, :] < N))


def _mm(x, w_strides, w, bias, block_expert, block, n, k):
    y = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    grid = lambda meta: (len(block_expert), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _grouped_mm[grid](x, w, bias if bias is not None else w, block_expert, y, n, k, *x.stride(),
                      *w_strides, bias.stride(0) if bias is not None else 0, *y.stride(),
                      HAS_BIAS=bias is not None, BLOCK_M=block, DOT=dot_precision(x.dtype))
    return y


@torch.library.custom_op("kcap::grouped_linear", mutates_args=())
def _grouped_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                block_expert: torch.Tensor, block: int) -> torch.Tensor:
    E, K, N = weight.shape
    return _mm(x, weight.stride(), weight, bias, block_expert, block, N, K)


@_grouped_op.register_fake
def _grouped_fake(x, weight, bias, block_expert, block):
    return x.new_empty((x.shape[0], weight.shape[2]))


@torch.library.custom_op("kcap::grouped_linear_bwd", mutates_args=())
def _grouped_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, block_expert: torch.Tensor,
                 block: int, has_bias: bool) -> list[torch.Tensor]:
    E, K, N = weight.shape
    dy = dy.contiguous()
    # dx = dy @ weight[e]^T: the same kernel, weight read as (E, N, K) through its strides.
    dx = _mm(dy, (weight.stride(0), weight.stride(2), weight.stride(1)), weight, None,
             block_expert, block, K, N)
    # Rows per expert without a host sync (bincount would need one); -1 blocks are skipped.
    blocks = torch.zeros(E + 1, dtype=torch.int64, device=x.device)
    blocks.scatter_add_(0, block_expert + 1, torch.ones_like(block_expert))
    seg = torch.zeros(E + 1, dtype=torch.int64, device=x.device)
    seg[1:] = (blocks[1:] * block).cumsum(0)
    # Unused (-1) blocks sit after every used one, so the experts' runs start at row 0.
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grid = lambda meta: (E, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _grouped_wgrad[grid](x, dy, seg, dw, N, K, *x.stride(), *dy.stride(), *dw.stride(), BLOCK_M=block,
                         DOT=dot_precision(x.dtype))
    grads = [dx, dw]
    if has_bias:  # unused blocks get dy = 0, so clamping their expert id to 0 adds nothing
        row_expert = block_expert.clamp(min=0).repeat_interleave(block)
        grads.append(torch.zeros(E, N, dtype=torch.float32, device=x.device)
                     .index_add_(0, row_expert, dy.float()).to(dy.dtype))
    return grads


@_grouped_bwd.register_fake
def _grouped_bwd_fake(dy, x, weight, block_expert, block, has_bias):
    grads = [torch.empty_like(x), torch.empty_like(weight)]
    if has_bias:
        grads.append(weight.new_empty((weight.shape[0], weight.shape[2])))
    return grads


def _setup(ctx, inputs, output):
    x, weight, bias, block_expert, block = inputs
    ctx.save_for_backward(x, weight, block_expert)
    ctx.block, ctx.has_bias = block, bias is not None


def _backward(ctx, dy):
    x, weight, block_expert = ctx.saved_tensors
    grads = _grouped_bwd(dy, x, weight, block_expert, ctx.block, ctx.has_bias)
    return grads[0], grads[1], (grads[2] if ctx.has_bias else None), None, None


_grouped_op.register_autograd(_backward, setup_context=_setup)


def grouped_linear(x, weight, bias, block_expert, block: int):
    """y[r] = x[r] @ weight[e] + bias[e], e the expert of row r's block; see the docstring."""
    for name, t in (("x", x), ("weight", weight), ("block_expert", block_expert)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
    if weight.ndim != 3 or x.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"need x (P, K) and weight (E, K, N); got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0], weight.shape[2]):
        raise ValueError(f"bias must be (E, N) = {(weight.shape[0], weight.shape[2])}, got {tuple(bias.shape)}")
    if block_expert.dtype != torch.int64 or block_expert.ndim != 1:
        raise TypeError("block_expert must be a 1-d int64 tensor")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if x.shape[0] != len(block_expert) * block:
        raise ValueError(f"x has {x.shape[0]} rows; {len(block_expert)} blocks of {block} need "
                         f"{len(block_expert) * block}")
    check_device(x, weight, block_expert, *([bias] if bias is not None else []))
    if x.shape[0] == 0:
        return x.new_zeros((0, weight.shape[2])) + 0 * weight.sum()
    return _grouped_op(x, weight, bias, block_expert, block)


def grouped_linear_reference(x, weight, bias, block_expert, block: int):
    """Plain PyTorch: a loop over row blocks."""
    rows = []
    for b, e in enumerate(block_expert.tolist()):
        if e < 0:  # an unused block
            rows.append(x.new_zeros((block, weight.shape[2])))
            continue
        y = x[b * block:(b + 1) * block] @ weight[e]
        rows.append(y + bias[e] if bias is not None else y)
    return torch.cat(rows) if rows else x.new_zeros((0, weight.shape[2]))
