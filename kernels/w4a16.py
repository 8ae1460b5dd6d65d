"""W4A16 for fp16/bf16 activations, with int4 codes dequantized two per integer op.

    w4a16_matmul(x2, qweight, scales, zeros, group_size, bias=None)   # (M, K) -> (M, N)

Same format and arithmetic as quant_matmul's int4 path (codes minus zero points are exact in
fp16/bf16; each group's dot accumulates in fp32 and takes its group's scale in fp32), with
two costs removed:

- Dequantizing. The packed weight is read as int32 words, eight codes each. Two codes come
  out of a word per shift-and-mask, already placed as the low mantissa bits of a 16-bit
  float whose exponent makes it ``BASE + q`` (BASE = 128 in bf16, 1024 in fp16, where the
  spacing is exactly 1); subtracting ``BASE + zero`` is then exact. That replaces one
  integer-to-float conversion (quarter rate on an H100) and one fp32 subtract per weight:
  in the offline SASS of the main loop, instructions per weight drop from 7-10 to 4.1-4.8
  (M <= 16) and from 9.6-21 to 4.6-6.1 (tiles), by ``python -m bench registers``.
- Launches, at decode sizes (M <= 16, ``_w4_split``). K is split across programs so that a
  handful of rows still fills the GPU, and the last program of each column tile to finish
  (counted with an atomic) adds the partial sums in split order, adds the bias and writes
  the output: one kernel instead of kernel + sum + cast, and the same bits on every call
  (no float atomics). Larger M (``_w4_tiled``) use 2-d tiles over the whole K.

The weight is the A operand of the dot (its N rows are the MMA's M side, as in Marlin):
with BLOCK_N >= 64 that is one Hopper warpgroup MMA per group, instead of a 16-row one
padded with unused rows of x when M is small.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import UPCAST as _UPCAST_FLAG, config, configs

UPCAST = tl.constexpr(_UPCAST_FLAG)
SPLIT_MAX_M = 16  # rows served by the split-K kernel; more go to the tiled one
# Split counts are part of each split candidate: its grid is (N tiles, SPLIT_K).
SPLIT_CANDIDATES = [config(BLOCK_N=128, SPLIT_K=8, num_warps=4, num_stages=3),
                    config(BLOCK_N=64, SPLIT_K=8, num_warps=4, num_stages=3),
                    config(BLOCK_N=256, SPLIT_K=16, num_warps=8, num_stages=3),
                    config(BLOCK_N=128, SPLIT_K=4, num_warps=4, num_stages=4),
                    config(BLOCK_N=64, SPLIT_K=16, num_warps=4, num_stages=2)]
TILED_CANDIDATES = [config(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
                    config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                    config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                    config(BLOCK_M=64, BLOCK_N=256, num_warps=8, num_stages=3)]
MAX_SPLIT = max(c.kwargs["SPLIT_K"] for c in SPLIT_CANDIDATES)
MIN_SPLIT_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in SPLIT_CANDIDATES)


@triton.jit
def _two_codes(w, SHIFT: tl.constexpr, MAGIC: tl.constexpr, DT: tl.constexpr):
    """Codes at bits SHIFT..SHIFT+3 and 16+SHIFT..19+SHIFT of each int32 as DT values
    BASE + q, joined on a new last axis: k offsets SHIFT / 4 and SHIFT / 4 + 4 of the word."""
    v = ((w >> SHIFT) & 0x000F000F) | (MAGIC * 0x10001)
    lo = (v & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
    hi = ((v >> 16) & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _codes(w, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, MAGIC: tl.constexpr, DT: tl.constexpr):
    """(BLOCK_N, GROUP // 8) int32 words -> (BLOCK_N, GROUP) DT values BASE + q, in k order.
    Word byte j holds codes 2j (low nibble) and 2j + 1; the joins below nest (h, b, a) so
    that flattening gives k = 4h + 2b + a for the code at shift 8b + 4a, half h."""
    b0 = tl.join(_two_codes(w, 0, MAGIC, DT), _two_codes(w, 8, MAGIC, DT))
    b1 = tl.join(_two_codes(w, 4, MAGIC, DT), _two_codes(w, 12, MAGIC, DT))
    return tl.reshape(tl.join(b0, b1), (BLOCK_N, GROUP))


@triton.jit
def _yt_tile(X, W, S, Z, sxm, sxk, swn, ssn, ssg, offs_m, offs_n, in_m, in_n, k_lo, k_hi,
             GROUP: tl.constexpr, MAGIC: tl.constexpr, BASE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_N, BLOCK_M) fp32: the tile of y.T over k_lo <= k < k_hi (whole groups)."""
    DT = X.dtype.element_ty
    words = tl.arange(0, GROUP // 8)
    kk = tl.arange(0, GROUP)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(k_lo, k_hi, GROUP):
        g = k0 // GROUP
        w = tl.load(W + offs_n[:, None] * swn + (k0 // 8 + words)[None, :], mask=in_n[:, None],
                    other=0)
        zero = tl.load(Z + offs_n * ssn + g * ssg, mask=in_n, other=0).to(tl.float32)
        scale = tl.load(S + offs_n * ssn + g * ssg, mask=in_n, other=0.0)
        q = _codes(w, BLOCK_N, GROUP, MAGIC, DT) - (zero + BASE).to(DT)[:, None]  # exact
        xt = tl.load(X + offs_m[None, :] * sxm + (k0 + kk)[:, None] * sxk, mask=in_m[None, :],
                     other=0.0)
        if UPCAST:  # the interpreter's half-precision dot is not fp32-accumulated
            q = q.to(tl.float32)
            xt = xt.to(tl.float32)
        acc += tl.dot(q, xt) * scale[:, None]
    return acc


@triton.jit
def _store(OUT, BIAS, acc, tile, inside, offs_n, in_n, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=in_n, other=0.0).to(tl.float32)[:, None]
    tl.store(OUT + tile, acc.to(OUT.dtype.element_ty), mask=inside)


@triton.autotune(configs=configs(SPLIT_CANDIDATES), key=["N", "K", "GROUP"])
@triton.jit
def _w4_split(X, W, S, Z, BIAS, OUT, PART, COUNT, M, N, K, sxm, sxk, swn, ssn, ssg,
              GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr,
              BASE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_m = offs_m < M
    in_n = offs_n < N
    per_split = tl.cdiv(tl.cdiv(K, GROUP), SPLIT_K) * GROUP
    k_lo = pid_k * per_split
    acc = _yt_tile(X, W, S, Z, sxm, sxk, swn, ssn, ssg, offs_m, offs_n, in_m, in_n, k_lo,
                   tl.minimum(K, k_lo + per_split), GROUP, MAGIC, BASE, 16, BLOCK_N)
    tile = offs_m[None, :] * N + offs_n[:, None]
    inside = in_m[None, :] & in_n[:, None]
    if SPLIT_K > 1:
        tl.store(PART + pid_k * M * N + tile, acc, mask=inside)
        tl.debug_barrier()  # every thread's partial is stored before the count goes up
        arrived = tl.atomic_add(COUNT + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # last of this tile: add the partials in split order
            acc = tl.zeros([BLOCK_N, 16], tl.float32)
            for s in range(0, SPLIT_K):
                acc += tl.load(PART + s * M * N + tile, mask=inside, other=0.0,
                               cache_modifier=".cg")
            tl.atomic_xchg(COUNT + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next call
            _store(OUT, BIAS, acc, tile, inside, offs_n, in_n, HAS_BIAS)
    else:
        _store(OUT, BIAS, acc, tile, inside, offs_n, in_n, HAS_BIAS)


@triton.autotune(configs=configs(TILED_CANDIDATES), key=["M", "N", "K", "GROUP"])
@triton.jit
def _w4_tiled(X, W, S, Z, BIAS, OUT, M, N, K, sxm, sxk, swn, ssn, ssg,
              GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, MAGIC: tl.constexpr,
              BASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    in_n = offs_n < N
    acc = _yt_tile(X, W, S, Z, sxm, sxk, swn, ssn, ssg, offs_m, offs_n, in_m, in_n, 0, K,
                   GROUP, MAGIC, BASE, BLOCK_M, BLOCK_N)
    _store(OUT, BIAS, acc, offs_m[None, :] * N + offs_n[:, None], in_m[None, :] & in_n[:, None],
           offs_n, in_n, HAS_BIAS)


# One zeroed counter array per (device, stream): the split kernel leaves it zeroed again,
# and two streams running at once must not share one.
_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    have = _COUNTERS.get(key)
    if have is None or have.numel() < n:
        have = _COUNTERS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return have


def supports(x2: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether w4a16_matmul serves this call: fp16/bf16 activations and a packed weight whose
    rows can be read as int32 words (contiguous bytes, 4-byte aligned)."""
    return (x2.dtype in (torch.float16, torch.bfloat16) and qweight.stride(1) == 1
            and qweight.stride(0) % 4 == 0 and qweight.data_ptr() % 4 == 0)


def w4a16_matmul(x2, qweight, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    """x2 (M, K) fp16/bf16 @ dequant(qweight (N, K // 2) uint8, scales (N, K // G) float32,
    zeros (N, K // G) uint8).T (+ bias (N,) in x2's dtype) -> (M, N) in x2's dtype.
    Inputs are checked by quant_matmul.int4_matmul, which calls this where ``supports``."""
    if x2.ndim != 2 or not supports(x2, qweight):
        raise ValueError("w4a16_matmul needs (M, K) fp16/bf16 rows and an int32-readable weight")
    M, K = x2.shape
    n = qweight.shape[0]
    words = qweight.view(torch.int32)
    out = torch.empty((M, n), device=x2.device, dtype=x2.dtype)
    fp16 = x2.dtype == torch.float16
    common = dict(GROUP=group_size, HAS_BIAS=bias is not None, MAGIC=0x6400 if fp16 else 0x4300,
                  BASE=1024.0 if fp16 else 128.0)
    args = (M, n, K, x2.stride(0), x2.stride(1), words.stride(0), scales.stride(0),
            scales.stride(1))
    bias = bias if bias is not None else scales  # not read without HAS_BIAS
    if M <= SPLIT_MAX_M:
        part = torch.empty((MAX_SPLIT, M, n), device=x2.device, dtype=torch.float32)
        count = _counters(x2.device, triton.cdiv(n, MIN_SPLIT_BLOCK_N))
        _w4_split[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](
            x2, words, scales, zeros, bias, out, part, count, *args, **common)
    else:
        _w4_tiled[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))](
            x2, words, scales, zeros, bias, out, *args, **common)
    return out
