"""Flash attention in Triton: forward and backward, causal or not, grouped-query.

    flash_attention(q, k, v, causal=True, scale=None, return_lse=False)

q: (B, H, T, D); k, v: (B, KV, S, D) with KV dividing H (query head h reads KV head
h // (H / KV), torch SDPA's ``enable_gqa`` convention; K/V are never repeated in memory);
D in {32, 64, 128}; fp16, bf16 or fp32 (fp32 dots run as TF32 on a GPU). Any strides.
Causal masking is top-left aligned like SDPA's ``is_causal``: query i sees keys j <= i.
Returns the output in q's shape and dtype, and with ``return_lse`` the log-sum-exp of each
score row (B, H, T) float32, natural log (no gradient flows through it).

Forward: online softmax in fp32 (base-2 exponentials; the log-sum-exp is kept for the
backward). Key blocks wholly visible to a query block run without masks; only the diagonal
and the sequence tail are masked. Backward: a preprocessing pass computes
delta = rowsum(dO * O); one kernel per key block accumulates dK and dV over every query
block of every query head sharing that KV head, another per query block accumulates dQ,
so nothing needs atomics and the results are deterministic.

The autograd Function is a ``torch.library`` custom op (``kcap::flash_attn_fwd`` /
``kcap::flash_attn_bwd``), so ``torch.compile(fullgraph=True)`` sees no graph break.
``attention_reference`` is the plain PyTorch definition the tests hold it to.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .runtime import (UPCAST as _UPCAST_FLAG, check_device, config, configs, dot_precision,
                      vmapped_first)

LOG2E = 1.4426950408889634
UPCAST = tl.constexpr(_UPCAST_FLAG)  # a global the kernels may read (must be constexpr)
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tile(base, rows, row_stride, cols, col_stride, n_rows):
    """The (rows x cols) tile at base, rows >= n_rows read as 0; fp32 under the interpreter."""
    t = tl.load(base + rows[:, None] * row_stride + cols[None, :] * col_stride,
                mask=rows[:, None] < n_rows, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


# --- forward -----------------------------------------------------------------------------
@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, sks, skd, svs, svd, offs_m, lo, hi, S,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, DOT: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            k = _tile(k_base, cols, sks, offs_d, skd, S)
            v = _tile(v_base, cols, svs, offs_d, svd, S)
        else:
            k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :] * skd)
            v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :] * svd)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT)  # scaled below: one FMA per score
        if MASKED:
            valid = cols[None, :] < S
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0: the max commutes
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
        m_i = m_new
    return acc, m_i, l_i


# Autotuning candidates (tests/kernels check each one alone against the reference).
FWD_CANDIDATES = [config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
                  config(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                  config(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
                  config(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)]
# Trials (KCAP_TRIAL_CANDIDATES=1, kernels/runtime.py) for T = 512, where the forward trails
# SDPA: a wider key tile and a deeper pipeline, neither spilling in the offline sm_90 compile
# (bench/results/registers-sm90-*.md).
FWD_TRIALS = [config(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
              config(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4)]


@triton.autotune(configs=configs(FWD_CANDIDATES, FWD_TRIALS), key=["T", "S", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                sob, soh, sot, sod,
                H, GROUP, T, S, qk_scale,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _tile(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, sqd, T)
    k_base = K + b * skb + kv * skh
    v_base = V + b * svb + kv * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Whole key blocks that every row may see need no mask: below the diagonal block for
    # causal attention, and before the sequence tail.
    full = (S // BLOCK_N) * BLOCK_N
    hi = S
    if CAUSAL:
        full = tl.minimum(full, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, sks, skd, svs, svd, offs_m,
                               0, full, S, qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, DOT)
    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, sks, skd, svs, svd, offs_m,
                               full, hi, S, qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT)
    acc = acc / l_i[:, None]
    rows = offs_m < T
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=rows[:, None])
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.log2(l_i), mask=rows)


# --- backward ----------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, sot, sod, sdb, sdh, sdt, sdd, H, T,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
                mask=rows, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd,
                 mask=rows, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _bwd_scores(q, k, v, do, lse, delta, offs_m, cols, T, S, qk_scale, masked,
                CAUSAL: tl.constexpr, DOT: tl.constexpr):
    """Recomputed probabilities P (zero outside the sequences and, if causal, above the
    diagonal) and dS = P * (dO V^T - delta) of one (query block, key block) tile. Only
    tiles that hold such entries (``masked``, a branch taken per tile) pay for the mask: one
    loop with a branch, not a loop per kind of tile as in the forward, because separate
    loops raised the dK/dV kernel's registers (205 -> 237 at head dim 64) and its spills."""
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale - lse[:, None])
    if masked:
        valid = (offs_m[:, None] < T) & (cols[None, :] < S)
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
    return p, p * (tl.dot(do, tl.trans(v), input_precision=DOT) - delta[:, None])


# No BLOCK_M = 32 candidates: on an H100 with Triton 3.6, (32, 64) gave a wrong dK at
# head dim 128 and (32, 128, 3 stages) at head dim 64, in fp16 and bf16, while the
# interpreter computes both right (bench/results/attention-configs-gpu-2026-11-24.md).
BWD_CANDIDATES = [config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
                  config(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)]
# Trials: 8 warps give dK/dV's accumulators twice the registers (no spills at head dim 128
# in the offline compile, where both candidates above spill); a deeper pipeline (spills at
# head dim 128, as the first candidate does); taller query tiles (fewer, longer dQ
# programs; fewer loop trips in dK/dV).
BWD_TRIALS = [config(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
              config(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
              config(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)]


@triton.autotune(configs=configs(BWD_CANDIDATES, BWD_TRIALS), key=["T", "S", "HEAD_DIM", "CAUSAL", "GROUP"])
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                     sdb, sdh, sdt, sdd, sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd,
                     H, KV, GROUP, T, S, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = pid_bkv // KV
    kv = pid_bkv % KV
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_s = cols[:, None] < S
    k = _tile(K + b * skb + kv * skh, cols, sks, offs_d, skd, S)
    v = _tile(V + b * svb + kv * svh, cols, svs, offs_d, svd, S)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Only query blocks before `band` hold entries above the diagonal and take the mask.
    # Entries past the sequences' ends need none here: a row past T has q = dO = 0 and
    # lse = delta = 0, so it adds exactly 0; a column past S only feeds its own dK, dV
    # rows, which are not stored.
    n0 = pid_n * BLOCK_N
    start = 0
    band = 0
    if CAUSAL:  # queries before this key block cannot see it
        start = n0 // BLOCK_M * BLOCK_M
        band = start + tl.cdiv(n0 + BLOCK_N - 1 - start, BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = kv * GROUP + g
        for start_m in range(start, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            rows = offs_m < T
            q = _tile(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, sqd, T)
            do = _tile(DO + b * sdb + h * sdh, offs_m, sdt, offs_d, sdd, T)
            lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=rows, other=0.0)
            delta = tl.load(DELTA + (b * H + h) * T + offs_m, mask=rows, other=0.0)
            p, ds = _bwd_scores(q, k, v, do, lse, delta, offs_m, cols, T, S, qk_scale,
                                start_m < band, CAUSAL, DOT)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT)
    tl.store(DK + b * sdkb + kv * sdkh + cols[:, None] * sdks + offs_d[None, :] * sdkd,
             (dk * scale).to(DK.dtype.element_ty), mask=in_s)
    tl.store(DV + b * sdvb + kv * sdvh + cols[:, None] * sdvs + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=in_s)


@triton.autotune(configs=configs(BWD_CANDIDATES, BWD_TRIALS), key=["T", "S", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                   sdb, sdh, sdt, sdd, sdqb, sdqh, sdqt, sdqd,
                   H, GROUP, T, S, qk_scale, scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kv = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < T
    q = _tile(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, sqd, T)
    do = _tile(DO + b * sdb + h * sdh, offs_m, sdt, offs_d, sdd, T)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=rows, other=0.0)
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=rows, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # As in the forward, key blocks before `full` are whole and below the diagonal block and
    # take no mask. Columns past S must be masked here (their P = 2^-lse could overflow);
    # rows past T need none (q = dO = lse = delta = 0 there, and they are not stored).
    full = (S // BLOCK_N) * BLOCK_N
    hi = S
    if CAUSAL:
        full = tl.minimum(full, (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _tile(K + b * skb + kv * skh, cols, sks, offs_d, skd, S)
        v = _tile(V + b * svb + kv * svh, cols, svs, offs_d, svd, S)
        _, ds = _bwd_scores(q, k, v, do, lse, delta, offs_m, cols, T, S, qk_scale,
                            start_n >= full, CAUSAL, DOT)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :] * sdqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None])


# --- launchers ---------------------------------------------------------------------------
def _forward(q, k, v, causal: bool, scale: float):
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    _fwd_kernel[grid](q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                      H, H // KV, T, S, scale * LOG2E, HEAD_DIM=D, CAUSAL=causal,
                      DOT=dot_precision(q.dtype))
    return o, lse


def _backward(do, q, k, v, o, lse, causal: bool, scale: float):
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(T, 64), B * H)](o, do, delta, *o.stride(), *do.stride(), H, T,
                                                   HEAD_DIM=D, BLOCK_M=64)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    qk_scale, dot = scale * LOG2E, dot_precision(q.dtype)
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * KV)](
        q, k, v, do, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dk.stride(), *dv.stride(), H, KV, H // KV, T, S, qk_scale, scale, HEAD_DIM=D,
        CAUSAL=causal, DOT=dot)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dq.stride(), H, H // KV, T, S, qk_scale, scale, HEAD_DIM=D, CAUSAL=causal, DOT=dot)
    return dq, dk, dv


# --- torch.library op and autograd ---------------------------------------------------------
@torch.library.custom_op("kcap::flash_attn_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("kcap::flash_attn_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            o: torch.Tensor, lse: torch.Tensor, causal: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, causal, scale)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _autograd_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --- vmap: a leading (e.g. model) dimension folds into the batch --------------------------
def _fold(x, dim, n):
    """x with its vmapped dim ``dim`` (None: not vmapped, so expanded) merged into the batch:
    (n * B, ...)."""
    x = vmapped_first(x, dim, n)
    return x.reshape(n * x.shape[1], *x.shape[2:])


def _unfold(x, n):
    return x.view(n, -1, *x.shape[1:])


@_fwd_op.register_vmap
def _fwd_vmap(info, in_dims, q, k, v, causal, scale):
    # attention never mixes batch rows, so M models' (B, H, T, D) are one (M * B, ...) call
    # (a pack's attention, kcap.pack): one launch instead of vmap's loop over the models.
    # Autograd records the op called here, so the backward runs on the folded tensors
    # outside vmap and needs no rule of its own.
    n = info.batch_size
    o, lse = _fwd_op(*(_fold(x, d, n) for x, d in zip((q, k, v), in_dims[:3])), causal, scale)
    return (_unfold(o, n), _unfold(lse, n)), (0, 0)


# --- public API ------------------------------------------------------------------------------
def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_device(q, k, v)
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v must be (batch={B}, kv_heads, seq, head_dim={D}), got {tuple(k.shape)}")
    if k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(f"kv_heads ({k.shape[1]}) must divide the query heads ({H})")
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {D}")
    if T < 1 or k.shape[2] < 1 or B < 1:
        raise ValueError(f"batch and sequence lengths must be >= 1, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: float | None = None, return_lse: bool = False):
    """Attention softmax(q k^T * scale [+ causal mask]) v; see the module docstring.

    q: (B, H, T, D); k, v: (B, KV, S, D); returns (B, H, T, D) in q.dtype, and the natural
    log-sum-exp (B, H, T) float32 if ``return_lse``.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    o, lse = _fwd_op(q, k, v, bool(causal), scale)
    return (o, lse.detach() / LOG2E) if return_lse else o


def attention_reference(q, k, v, causal: bool = True, scale: float | None = None):
    """Plain PyTorch attention with the same conventions (GQA expanded), in q's dtype."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        T, S = q.shape[2], k.shape[2]
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v
