"""Each kernel's computation, forward and backward, at a given ``precision.Precision``.

With ``EXACT`` (fp64 throughout) a function gives the reference the kernels are measured
against; with ``at(dtype)`` it gives the model of the error rule (``precision.py``): the same
formulas rounded where the GPU kernels round. Backward passes are explicit formulas, not
autograd, whose reductions over broadcast dimensions would bring back host-dependent
orders. ``magnitudes=True`` adds the absolute-value computation of each output (see
precision.py); it is only a scale, computed with ordinary torch ops.

Rounding points, read from kernels/*.py (``p.round`` marks each; inputs are given in the
storage dtype, so ``p.cast`` is exact):

- attention: P cast to the input dtype before the P @ V and P^T @ dO dots, dS before the
  dQ and dK dots (on a GPU; the interpreter upcasts tiles to fp32 so there they are exact,
  which only makes the kernel more accurate than the model), the outputs. Base-2 softmax
  with qk_scale = scale * log2(e) as the kernels compute it; delta from the stored O.
- fused MLP: the pre-activations g, u (a) and the hidden h are stored in the input dtype,
  then y = h W_down^T + b_down; backward dh = dy W_down, dg, du (da) stored, then cuBLAS
  matmuls for dx, the weight gradients and bias sums. The split MLP (cuBLAS GEMMs around
  an elementwise kernel) rounds the same, and also stores dh (``round_dh``).
- grouped GEMM: each row's product with its expert's weight plus bias, dx = dy W^T, and
  dW[e] summed over the rows of expert e in order; bias gradients summed in fp32.
- quantized matmul: int codes (minus zero point) times x summed in fp32, scaled per output
  channel (int8) or per group (int4) in fp32; from DEQUANT_MIN_M rows the weight is first
  dequantized to x's dtype (as the kernel's large-M path does).
"""
from __future__ import annotations

import torch

from kcap.kernels import quant_matmul as Q
from kcap.kernels.attention import LOG2E

from .precision import Precision, magnitude_matmul


def _by_kv_head(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, H, T, X) -> (B, KV, group * T, X): the rows a KV head's gradient sums over, in the
    kernels' order (query heads of the group outer, queries inner)."""
    B, H, T, X = x.shape
    return x.reshape(B, H // group, group * T, X)


def attention(q, k, v, do, causal: bool, scale: float, p: Precision, magnitudes: bool = False):
    """Flash attention's outputs {out, lse, dq, dk, dv} (and their magnitudes if asked).

    q (B, H, T, D), k and v (B, KV, S, D), do (B, H, T, D), all in the storage dtype; lse is
    the natural log-sum-exp (B, H, T) in fp32 (``p.acc``), the rest in ``p.acc`` holding
    values of the storage dtype."""
    B, H, T, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    group = H // KV
    q, k, v, do = (p.cast(t) for t in (q, k, v, do))
    kh, vh = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    x = p.matmul(q, kh.transpose(-1, -2)) * p.scalar(scale * LOG2E)  # log2-domain scores
    if causal:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        x = x.masked_fill(~visible, float("-inf"))
    m = x.amax(-1, keepdim=True)
    prob = p.fn(torch.exp2, x - m)  # unnormalised, as in the forward kernel
    denom = p.sum(prob, -1).unsqueeze(-1)
    out = p.round(p.matmul(p.round(prob), vh) / denom)
    lse2 = m + p.fn(torch.log2, denom)
    lse = (lse2 / p.scalar(LOG2E)).squeeze(-1)
    # backward: P recomputed from the log-sum-exp, dS = P * (dO V^T - rowsum(dO * O))
    delta = p.sum(do * out, -1).unsqueeze(-1)
    prob = p.fn(torch.exp2, x - lse2)
    dp = p.matmul(do, vh.transpose(-1, -2))
    ds = prob * (dp - delta)
    scale_t = p.scalar(scale)
    dv = p.round(p.matmul(_by_kv_head(p.round(prob), group).transpose(-1, -2), _by_kv_head(do, group)))
    dk = p.round(p.matmul(_by_kv_head(p.round(ds), group).transpose(-1, -2), _by_kv_head(q, group))
                 * scale_t)
    dq = p.round(p.matmul(p.round(ds), kh) * scale_t)
    values = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    if not magnitudes:
        return values
    prob = prob.double()
    mag_x = magnitude_matmul(q, kh.transpose(-1, -2)) * (scale * LOG2E)
    mag_x = mag_x.masked_fill(prob == 0, 0.0)
    mag_ds = prob * (magnitude_matmul(do, vh.transpose(-1, -2))
                     + (do.double() * out.double()).abs().sum(-1, keepdim=True))
    mags = {"out": magnitude_matmul(prob, vh),
            "lse": (mag_x.amax(-1) + torch.log2(denom.double()).abs().squeeze(-1)) / LOG2E,
            "dq": magnitude_matmul(mag_ds, kh) * scale,
            "dk": magnitude_matmul(_by_kv_head(mag_ds, group).transpose(-1, -2),
                                   _by_kv_head(q, group)) * scale,
            "dv": magnitude_matmul(_by_kv_head(prob, group).transpose(-1, -2), _by_kv_head(do, group))}
    return values, mags


# --- fused MLP ---------------------------------------------------------------------------------
def _act(a, gelu: bool, p: Precision):
    """silu(a) = a * sigmoid(a), or gelu(a) = 0.5 a (1 + erf(a / sqrt 2)), as the epilogue."""
    if gelu:
        return (p.scalar(0.5) * a) * (1 + p.fn(torch.erf, a * p.scalar(0.7071067811865476)))
    return a * p.fn(torch.sigmoid, a)


def _act_grad(a, gelu: bool, p: Precision):
    """silu'(a) = s (1 + a (1 - s)), or gelu'(a) = Phi(a) + a phi(a), as the epilogue."""
    if gelu:
        cdf = p.scalar(0.5) * (1 + p.fn(torch.erf, a * p.scalar(0.7071067811865476)))
        return cdf + (a * p.scalar(0.3989422804014327)) * p.fn(torch.exp, (p.scalar(-0.5) * a) * a)
    s = p.fn(torch.sigmoid, a)
    return s * (1 + a * (1 - s))


def mlp(x, weights: dict, act: str, dy, p: Precision, magnitudes: bool = False,
        round_dh: bool = False):
    """fused_mlp's output y and gradients {y, x, w_up, w_down[, w_gate][, b_up, b_down
    [, b_gate]]} (gradient keys are the parameter names, as in the tests).

    x (M, K), w_up/w_gate (N, K), w_down (D, N), biases (N,)/(D,), dy (M, D), all in the
    storage dtype; act "silu" or "gelu" (the gated MLP is silu). ``round_dh``: dh = dy W_down
    is stored in the input dtype before the activation's backward (split_mlp's cuBLAS
    matmul), where fused_mlp keeps it in fp32."""
    x, dy = p.cast(x), p.cast(dy)
    w = {name: p.cast(t) for name, t in weights.items()}
    gated, gelu, bias = "w_gate" in w, act == "gelu", "b_up" in w
    biased = (lambda t, name: t + w[name]) if bias else (lambda t, name: t)  # noqa: E731
    up = p.round(biased(p.matmul(x, w["w_up"].t()), "b_up"))  # u, or the pre-activation a
    if gated:
        gate = p.round(biased(p.matmul(x, w["w_gate"].t()), "b_gate"))
        h = p.round(_act(gate, False, p) * up)
    else:
        h = p.round(_act(up, gelu, p))
    y = p.round(biased(p.matmul(h, w["w_down"].t()), "b_down"))
    dh = p.matmul(dy, w["w_down"])
    if round_dh:
        dh = p.round(dh)
    if gated:
        dgate = p.round((dh * up) * _act_grad(gate, False, p))
        dup = p.round(dh * _act(gate, False, p))
        dx = p.round(p.round(p.matmul(dup, w["w_up"])) + p.matmul(dgate, w["w_gate"]))
    else:
        dup = p.round(dh * _act_grad(up, gelu, p))
        dx = p.round(p.matmul(dup, w["w_up"]))
    values = {"y": y, "x": dx, "w_up": p.round(p.matmul(dup.t(), x)),
              "w_down": p.round(p.matmul(dy.t(), h))}
    if gated:
        values["w_gate"] = p.round(p.matmul(dgate.t(), x))
    if bias:
        values.update(b_up=p.round(p.sum(dup, 0)), b_down=p.round(p.sum(dy, 0)))
        if gated:
            values["b_gate"] = p.round(p.sum(dgate, 0))
    if not magnitudes:
        return values
    a = {name: t.double().abs() for name, t in w.items()}
    ax, ady = x.double().abs(), dy.double().abs()
    plus = (lambda t, name: t + a[name]) if bias else (lambda t, name: t)  # noqa: E731
    mag_up = plus(ax @ a["w_up"].t(), "b_up")
    if gated:
        mag_h = _act(gate, False, p).double().abs() * mag_up
    else:
        mag_h = _act(up, gelu, p).double().abs()
    mag_dh = ady @ a["w_down"]
    if gated:
        mag_dgate = mag_dh * mag_up * _act_grad(gate, False, p).double().abs()
        mag_dup = mag_dh * _act(gate, False, p).double().abs()
        mag_dx = mag_dup @ a["w_up"] + mag_dgate @ a["w_gate"]
    else:
        mag_dup = mag_dh * _act_grad(up, gelu, p).double().abs()
        mag_dx = mag_dup @ a["w_up"]
    mags = {"y": plus(mag_h @ a["w_down"].t(), "b_down"), "x": mag_dx, "w_up": mag_dup.t() @ ax,
            "w_down": ady.t() @ mag_h}
    if gated:
        mags["w_gate"] = mag_dgate.t() @ ax
    if bias:
        mags.update(b_up=mag_dup.sum(0), b_down=ady.sum(0))
        if gated:
            mags["b_gate"] = mag_dgate.sum(0)
    return values, mags


# --- grouped GEMM --------------------------------------------------------------------------------
def grouped_linear(x, weight, bias, block_expert, block: int, dy, p: Precision,
                   magnitudes: bool = False):
    """grouped_linear's output and gradients [y, dx, dweight(, dbias)].

    x (P, K), weight (E, K, N), bias (E, N) or None, dy (P, N) in the storage dtype;
    block_expert (n_blocks,) int64, -1 for unused blocks (zero rows, no gradient)."""
    x, w, dy = p.cast(x), p.cast(weight), p.cast(dy)
    b = p.cast(bias) if bias is not None else None
    E, K, N = w.shape
    y, dx = x.new_zeros(x.shape[0], N), x.new_zeros(x.shape)
    mag_y, mag_dx = torch.zeros_like(y, dtype=torch.float64), torch.zeros_like(dx, dtype=torch.float64)
    experts = block_expert.tolist()
    for i, e in enumerate(experts):
        if e < 0:
            continue
        rows = slice(i * block, (i + 1) * block)
        out = p.matmul(x[rows], w[e])
        y[rows] = p.round(out + b[e] if b is not None else out)
        dx[rows] = p.round(p.matmul(dy[rows], w[e].t()))
        mag_y[rows] = magnitude_matmul(x[rows], w[e]) + (b[e].double().abs() if b is not None else 0)
        mag_dx[rows] = magnitude_matmul(dy[rows], w[e].t())
    dw, mag_dw = torch.zeros_like(w), torch.zeros_like(w, dtype=torch.float64)
    db, mag_db = x.new_zeros(E, N), torch.zeros(E, N, dtype=torch.float64, device=x.device)
    for e in sorted(set(experts) - {-1}):
        rows = torch.cat([torch.arange(i * block, (i + 1) * block, device=x.device)
                          for i, owner in enumerate(experts) if owner == e])
        dw[e] = p.round(p.matmul(x[rows].t(), dy[rows]))
        db[e] = p.round(p.sum(dy[rows], 0))
        mag_dw[e] = magnitude_matmul(x[rows].t(), dy[rows])
        mag_db[e] = dy[rows].double().abs().sum(0)
    values, mags = [y, dx, dw], [mag_y, mag_dx, mag_dw]
    if bias is not None:
        values.append(db)
        mags.append(mag_db)
    return (values, mags) if magnitudes else values


# --- weight-only quantized matmul -----------------------------------------------------------------
def quant_matmul(x, codes, scales, group: int, bias, p: Precision, magnitudes: bool = False):
    """int8_matmul / int4_matmul's output y (M, N) (forward only).

    x (M, K) in the storage dtype; codes (N, K) the integer codes minus their zero points
    (exact in any float dtype); scales (N, K // group) float32 (int8: one group, group = K);
    bias (N,) or None."""
    x = p.cast(x)
    codes = codes.to(p.acc)
    scales = scales.to(p.acc)
    M, K = x.shape
    if M >= Q.DEQUANT_MIN_M:  # the large-M path: dequantize to x's dtype, then a matmul
        acc = p.matmul(x, p.round(codes * scales.repeat_interleave(group, 1)).t())
    else:  # per group: the codes' dot in fp32, then the group's scale
        acc = None
        for g0 in range(0, K, group):
            part = p.matmul(x[:, g0:g0 + group], codes[:, g0:g0 + group].t()) * scales[:, g0 // group]
            acc = part if acc is None else acc + part
    y = p.round(acc + p.cast(bias) if bias is not None else acc)
    if not magnitudes:
        return y
    weight = codes.double() * scales.double().repeat_interleave(group, 1)
    mag = magnitude_matmul(x, weight.t()) + (bias.double().abs() if bias is not None else 0)
    return y, mag


# --- fused linear cross-entropy --------------------------------------------------------------------

def linear_cross_entropy(x, w, b, targets, chunk: int, p: Precision, magnitudes: bool = False,
                         ignore_index: int = -100):
    """linear_cross_entropy's {loss, x, w[, b]} (gradients of the mean loss).

    x (N, D), w (V, D), b (V,) or None in the storage dtype; targets (N,) int64. Rounding
    points of kernels/cross_entropy.py: the chunk's logits (x W^T, then + b) stored in
    the input dtype; log-sum-exp and loss in fp32; the logits' gradient stored in the input
    dtype; dx = G W stored; dW summed in fp32 over chunks of G^T x, each stored in the input
    dtype first; db summed in fp32 from the stored G."""
    x, w = p.cast(x), p.cast(w)
    z = p.round(p.matmul(x, w.t()))
    if b is not None:
        z = p.round(z + p.cast(b))
    valid = targets != ignore_index
    inv_n = p.scalar(1.0) / p.scalar(float(max(int(valid.sum()), 1)))
    m = z.max(dim=1).values
    s = p.sum(p.fn(torch.exp, z - m[:, None]), 1)
    lse = m + p.fn(torch.log, s)
    safe = torch.where(valid, targets, 0)
    rows = torch.where(valid, lse - z[torch.arange(len(z)), safe], 0.0).to(p.acc)
    loss = p.sum(rows, 0) * inv_n
    scale = torch.where(valid, inv_n, 0.0).to(p.acc)[:, None]
    g = p.fn(torch.exp, z - lse[:, None]) * scale
    onehot = torch.zeros_like(g, dtype=torch.bool)
    onehot[valid, targets[valid]] = True
    g = p.round(torch.where(onehot, g - scale, g))
    values = {"loss": loss, "x": p.round(p.matmul(g, w))}
    dw = None
    for lo in range(0, len(x), chunk):
        part = p.round(p.matmul(g[lo:lo + chunk].t(), x[lo:lo + chunk]))
        dw = part if dw is None else dw + part
    values["w"] = p.round(dw)
    if b is not None:
        db = None
        for lo in range(0, len(x), chunk):
            part = p.sum(g[lo:lo + chunk], 0)
            db = part if db is None else db + part
        values["b"] = p.round(db)
    if not magnitudes:
        return values
    ax, aw, ag = x.double().abs(), w.double().abs(), g.double().abs()
    az = ax @ aw.t() + (b.double().abs() if b is not None else 0.0)
    mag_rows = torch.where(valid, lse.double().abs() + az.max(dim=1).values, 0.0)
    mags = {"loss": mag_rows.sum() * float(inv_n), "x": ag @ aw, "w": ag.t() @ ax}
    if b is not None:
        mags["b"] = ag.sum(0)
    return values, mags
