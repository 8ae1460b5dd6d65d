"""Weight-only quantized matmuls in Triton: W8A16 and W4A16 (formats: quant_pack.py).

    int8_matmul(x, qweight, scale, bias=None)                    # y = x @ dequant(W).T + b
    int4_matmul(x, qweight, scales, zeros, group_size, bias=None)

x: (..., K) float16, bfloat16 or float32; returns (..., N) in x's dtype. The weights stay
packed in memory and are dequantized inside the kernel; accumulation is fp32. Integer codes
(int8, or int4 minus its zero point) are exact in fp16/bf16, so the dot runs on them in the
activation dtype and the scales are applied to the fp32 accumulator: per output channel once
at the end (int8), per group after each K block (int4, whose K blocks are exactly one group).

Paths, chosen by the wrapper: int4 with fp16/bf16 activations goes to w4a16.py below
DEQUANT_MIN_M rows (it dequantizes two codes per integer op, and at M <= 16 splits K in one
launch); the kernels here serve int8, and int4 with fp32 activations: M <= 16 rows use
16-row tiles and split K across programs, writing fp32 partial sums that are added
afterwards (deterministic, no atomics) so that a handful of rows still fills the GPU; larger
M use ordinary 2-d tiles; from
DEQUANT_MIN_M rows on, the weight is dequantized to x's dtype in one pass and torch's matmul
(cuBLAS) does the rest, since at that size the matmul is compute-bound and reading the packed
weight saves nothing (on an H100 at M = 4096 the tiled kernel ran at 0.57x (int8) and 0.06x
(int4) of a bf16 cuBLAS matmul: bench/results/quant_matmul-gpu-2026-11-24.md).
Both are differentiable in x and the bias (dx = dy @ dequant(W), the weight being data, as
in QLoRA); without a gradient to compute they call the kernels directly.
``quant_matmul_reference`` is the plain PyTorch definition the tests hold them to.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import w4a16
from .quant_pack import check_group_size, dequantize_int4, dequantize_int8
from .runtime import INTERPRET, check_device, config, configs
from .runtime import UPCAST as _UPCAST_FLAG, dot_precision

UPCAST = tl.constexpr(_UPCAST_FLAG)
SMALL_M = 16
DEQUANT_MIN_M = 1024  # where dequantize + cuBLAS takes over (one measured point so far: 4096)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _wq_body(X, W, S, Z, BIAS, OUT, M, N, K, k_per_split, sxm, sxk, swn, swk, ssn, ssg, so_split,
             BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m[:, None] < M
    in_n = offs_n < N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if BITS == 8:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + offs_m[:, None] * sxm + ks[None, :] * sxk,
                        mask=in_m & (ks[None, :] < k_hi), other=0.0)
            w = tl.load(W + offs_n[:, None] * swn + ks[None, :] * swk,
                        mask=in_n[:, None] & (ks[None, :] < k_hi), other=0).to(tl.float32)
            if UPCAST:
                x = x.to(tl.float32)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT)
        acc = acc * tl.load(S + offs_n * ssn, mask=in_n, other=0.0)[None, :]
    else:
        half = tl.arange(0, BLOCK_K // 2)
        for k0 in range(k_lo, k_hi, BLOCK_K):  # BLOCK_K == GROUP: one group per block
            packed = tl.load(W + offs_n[:, None] * swn + (k0 // 2 + half)[None, :] * swk,
                             mask=in_n[:, None], other=0)
            g = k0 // GROUP
            zero = tl.load(Z + offs_n * ssn + g * ssg, mask=in_n, other=0).to(tl.float32)
            scale = tl.load(S + offs_n * ssn + g * ssg, mask=in_n, other=0.0)
            lo = (packed & 15).to(tl.float32) - zero[:, None]
            hi = (packed >> 4).to(tl.float32) - zero[:, None]
            x_even = tl.load(X + offs_m[:, None] * sxm + (k0 + 2 * half)[None, :] * sxk,
                             mask=in_m, other=0.0)
            x_odd = tl.load(X + offs_m[:, None] * sxm + (k0 + 2 * half + 1)[None, :] * sxk,
                            mask=in_m, other=0.0)
            if UPCAST:
                x_even = x_even.to(tl.float32)
                x_odd = x_odd.to(tl.float32)
            part = tl.dot(x_even, tl.trans(lo.to(x_even.dtype)), input_precision=DOT)
            part += tl.dot(x_odd, tl.trans(hi.to(x_odd.dtype)), input_precision=DOT)
            acc += part * scale[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    inside = in_m & in_n[None, :]
    if SPLIT:  # fp32 partial sums; the wrapper adds them (and the bias) in fp32
        tl.store(OUT + pid_k * so_split + tile, acc, mask=inside)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + tile, acc.to(OUT.dtype.element_ty), mask=inside)


# Autotuning candidates (tests/kernels check each one alone against the reference).
SMALL_CANDIDATES = [config(BLOCK_N=64, num_warps=4, num_stages=3),
                    config(BLOCK_N=128, num_warps=4, num_stages=4),
                    config(BLOCK_N=32, num_warps=2, num_stages=4),
                    config(BLOCK_N=256, num_warps=8, num_stages=3)]
LARGE_CANDIDATES = [config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                    config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                    config(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4),
                    config(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)]


@triton.autotune(configs=configs(SMALL_CANDIDATES), key=["N", "K", "BITS", "GROUP"])
@triton.jit
def _wq_small(X, W, S, Z, BIAS, OUT, M, N, K, k_per_split, sxm, sxk, swn, swk, ssn, ssg, so_split,
              BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_K: tl.constexpr, DOT: tl.constexpr,
              BLOCK_N: tl.constexpr):
    _wq_body(X, W, S, Z, BIAS, OUT, M, N, K, k_per_split, sxm, sxk, swn, swk, ssn, ssg, so_split,
             BITS, GROUP, SPLIT, HAS_BIAS, 16, BLOCK_N, BLOCK_K, DOT)


@triton.autotune(configs=configs(LARGE_CANDIDATES), key=["M", "N", "K", "BITS", "GROUP"])
@triton.jit
def _wq_large(X, W, S, Z, BIAS, OUT, M, N, K, k_per_split, sxm, sxk, swn, swk, ssn, ssg, so_split,
              BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_K: tl.constexpr, DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _wq_body(X, W, S, Z, BIAS, OUT, M, N, K, k_per_split, sxm, sxk, swn, swk, ssn, ssg, so_split,
             BITS, GROUP, SPLIT, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT)


@triton.jit
def _dequant_kernel(W, S, Z, OUT, N, K, swn, swk, ssn, ssg,
                    BITS: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT (N, K), contiguous, in its dtype = the dequantized weight, computed in fp32 as
    quant_pack.dequantize_int8/int4 do (so the two agree bit for bit)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    if BITS == 8:
        q = tl.load(W + rows[:, None] * swn + cols[None, :] * swk, mask=inside, other=0)
        w = q.to(tl.float32) * tl.load(S + rows * ssn, mask=rows < N, other=0.0)[:, None]
    else:
        byte = tl.load(W + rows[:, None] * swn + (cols // 2)[None, :] * swk, mask=inside, other=0)
        code = tl.where((cols % 2 == 0)[None, :], byte & 15, byte >> 4).to(tl.float32)
        g = (cols // GROUP)[None, :]
        zero = tl.load(Z + rows[:, None] * ssn + g * ssg, mask=inside, other=0).to(tl.float32)
        w = (code - zero) * tl.load(S + rows[:, None] * ssn + g * ssg, mask=inside, other=0.0)
    tl.store(OUT + rows[:, None] * K + cols[None, :], w.to(OUT.dtype.element_ty), mask=inside)


def _scale_strides(s, bits: int) -> tuple[int, int]:
    """(per output channel, per group) strides of the scales; int8 has no groups."""
    return (s.stride(0), s.stride(1)) if bits == 4 else (s.stride(0), 0)


def _dequantize(w, s, z, bits: int, group: int, n: int, K: int, dtype) -> torch.Tensor:
    out = torch.empty((n, K), device=w.device, dtype=dtype)
    ssn, ssg = _scale_strides(s, bits)
    block_n, block_k = 32, 128 if bits == 8 else max(group, 128)
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(K, block_k))](
        w, s, z if z is not None else s, out, n, K, w.stride(0), w.stride(1), ssn, ssg,
        BITS=bits, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _split_k(K: int, block_k: int) -> int:
    """K slices for the small-M path: enough programs to fill a GPU, each >= 4 K blocks."""
    if INTERPRET:
        return 2 if K >= 4 * block_k else 1  # exercise the split path cheaply
    return max(1, min(16, K // (4 * block_k)))


def _run(x, w, s, z, bits: int, group: int, n: int, bias):
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    block_k = group if bits == 4 else 64
    ssn, ssg = _scale_strides(s, bits)
    zz = z if z is not None else s
    bb = bias if bias is not None else s
    args = (M, n, K)
    dot = dot_precision(x.dtype)
    if M >= DEQUANT_MIN_M:
        out = torch.nn.functional.linear(x2, _dequantize(w, s, z, bits, group, n, K, x.dtype), bias)
    elif bits == 4 and w4a16.supports(x2, w):
        out = w4a16.w4a16_matmul(x2, w, s, z, group, bias)
    elif M <= SMALL_M:
        split = _split_k(K, block_k)
        k_per = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
        split = triton.cdiv(K, k_per)
        out = torch.empty((split, M, n) if split > 1 else (M, n), device=x.device,
                          dtype=torch.float32 if split > 1 else x.dtype)
        _wq_small[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)](
            x2, w, s, zz, bb, out, *args, k_per, x2.stride(0), x2.stride(1), w.stride(0),
            w.stride(1), ssn, ssg, M * n, BITS=bits, GROUP=group, SPLIT=split > 1,
            HAS_BIAS=bias is not None, BLOCK_K=block_k, DOT=dot)
        if split > 1:
            out = out.sum(0)
            out = (out + bias.float() if bias is not None else out).to(x.dtype)
    else:
        out = torch.empty((M, n), device=x.device, dtype=x.dtype)
        _wq_large[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)](
            x2, w, s, zz, bb, out, *args, K, x2.stride(0), x2.stride(1), w.stride(0), w.stride(1),
            ssn, ssg, 0, BITS=bits, GROUP=group, SPLIT=False, HAS_BIAS=bias is not None,
            BLOCK_K=block_k, DOT=dot)
    return out.view(*lead, n)


class _QuantMatmul(torch.autograd.Function):
    """_run with gradients for x and the bias: dx = dy @ dequant(W) (the weight is data, as
    in QLoRA: its codes take no gradient), computed by dequantizing to dy's dtype and one
    matmul, like the large-M forward path."""

    @staticmethod
    def forward(ctx, x, w, s, z, bits, group, n, bias):
        ctx.save_for_backward(w, s, z)
        ctx.meta = (bits, group, n, x.shape[-1], bias is not None)
        return _run(x, w, s, z, bits, group, n, bias)

    @staticmethod
    def backward(ctx, dy):
        w, s, z = ctx.saved_tensors
        bits, group, n, K, has_bias = ctx.meta
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ _dequantize(w, s, z, bits, group, n, K, dy.dtype)
        if has_bias and ctx.needs_input_grad[7]:
            db = dy.reshape(-1, n).sum(0)
        return dx, None, None, None, None, None, None, db


def _matmul(x, w, s, z, bits: int, group: int, n: int, bias):
    """_run, through autograd only where a gradient is wanted (decoding pays nothing)."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _QuantMatmul.apply(x, w, s, z, bits, group, n, bias)
    return _run(x, w, s, z, bits, group, n, bias)


def _check_x(x, bias, n):
    if not isinstance(x, torch.Tensor) or x.dtype not in DTYPES:
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (..., K) tensor, got shape {tuple(x.shape)}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({n},) in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def int8_matmul(x, qweight, scale, bias=None):
    """x (..., K) @ dequant(qweight (N, K) int8, scale (N,) float32).T (+ bias) -> (..., N)."""
    if qweight.dtype != torch.int8 or qweight.ndim != 2:
        raise TypeError(f"qweight must be a 2-d int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n, K = qweight.shape
    _check_x(x, bias, n)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {K}")
    if scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be ({n},) float32, got {tuple(scale.shape)} {scale.dtype}")
    check_device(x, qweight, scale, *([bias] if bias is not None else []))
    return _matmul(x, qweight, scale, None, 8, 0, n, bias)


def int4_matmul(x, qweight, scales, zeros, group_size: int, bias=None):
    """x (..., K) @ dequant(int4 packed (N, K/2) uint8, scales/zeros (N, K/G)).T (+ bias)."""
    if qweight.dtype != torch.uint8 or qweight.ndim != 2:
        raise TypeError(f"qweight must be a 2-d uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n, K = qweight.shape[0], 2 * qweight.shape[1]
    _check_x(x, bias, n)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the packed weight expects {K}")
    check_group_size(K, group_size)
    groups = (n, K // group_size)
    if scales.shape != groups or scales.dtype != torch.float32:
        raise ValueError(f"scales must be {groups} float32, got {tuple(scales.shape)} {scales.dtype}")
    if zeros.shape != groups or zeros.dtype != torch.uint8:
        raise ValueError(f"zeros must be {groups} uint8, got {tuple(zeros.shape)} {zeros.dtype}")
    check_device(x, qweight, scales, zeros, *([bias] if bias is not None else []))
    return _matmul(x, qweight, scales.contiguous(), zeros.contiguous(), 4, group_size, n, bias)


def quant_matmul_reference(x, qweight, scale, zeros=None, group_size=None, bias=None):
    """Plain PyTorch: x @ dequant(W).T in float32, then cast to x's dtype."""
    if zeros is None:
        w = dequantize_int8(qweight, scale)
    else:
        w = dequantize_int4(qweight, scale, zeros, group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
