"""The LM head and cross-entropy fused: logits never exist for the whole batch.

    linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, chunk=None)

x: (N, D) fp16/bf16/fp32; weight: (V, D) and bias (V,) in x's dtype (nn.Linear layout);
targets: (N,) int64. Returns the mean cross-entropy (fp32 scalar) over the targets that are
not ``ignore_index``, and its gradients for x, weight and bias through autograd.

Eager PyTorch materialises the (N, V) logits, their fp32 copy for the loss, the softmax and
its gradient: at the paper's shapes (N = 12K-200K tokens per step, V ~ 4.3K) those dwarf the
model's activations. Here the tokens go through in chunks of ``chunk`` rows (default: about
N * D / V, so a chunk's logits weigh about as much as x, but at least 64 MiB of them, so
that small widths do not make many small chunks whose launches outlast their arithmetic):
per chunk, a cuBLAS matmul writes the logits in x's dtype, one Triton kernel per row makes
two passes over them (online max / sum-exp in fp32 for the log-sum-exp and the loss; then
the gradient (softmax - onehot) / n_valid written over the logits in place), and two more
matmuls turn that gradient into the chunk's dx and its share of dW (accumulated in fp32).
The backward pass only scales the saved gradients by the incoming one. This is
Liger-Kernel's design (its fused linear cross-entropy; its chunks follow the x-size rule
alone), written for kcap. A ``torch.library`` custom op with autograd, like the other
kernels, so ``torch.compile`` sees no graph break.

No host synchronisation: the count of valid targets stays on the device. A target outside
[0, V) that is not ``ignore_index`` makes the loss NaN (the kernel cannot raise; checking
on the host would stall the GPU every step). ``linear_cross_entropy_reference`` is the
plain PyTorch definition the tests hold the kernel to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .runtime import check_device

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _ce_rows(logits_ptr, stride, targets_ptr, stride_tm, loss_ptr, stride_lm, inv_n_ptr,
             rows_per_model, V, ignore_index, BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """Row r of the (M * C, V) logits, model r // C's row r % C: its loss (fp32) and, in
    place, the logits' gradient (scaled by that model's 1 / n_valid)."""
    row = tl.program_id(0).to(tl.int64)
    model = row // rows_per_model
    ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + model * stride_tm + row % rows_per_model)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < V)
    # pass 1: log-sum-exp, online, in fp32 (a running max keeps exp() in range)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_target = tl.load(ptr + tl.where(valid, target, 0)).to(tl.float32)
    loss = tl.where(ignored, 0.0, tl.where(valid, lse - z_target, float("nan")))
    tl.store(loss_ptr + model * stride_lm + row % rows_per_model, loss)
    if not WRITE_GRAD:
        return
    # pass 2: d(mean loss)/d logits = (softmax - onehot) / n_valid, over the logits
    scale = tl.where(ignored, 0.0, tl.load(inv_n_ptr + model))
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(z - lse) * scale
        g = tl.where(cols == target, g - scale, g)
        tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _block_v(V: int) -> int:
    return min(4096, triton.next_power_of_2(V))


# A chunk costs about eight launches (three matmuls, the row kernel, the accumulations), so
# chunks must not be small: at the paper's widths the rule "a chunk's logits about the size
# of x" alone (Liger's) makes about V / D chunks, ~50-70 at D = 64 with kcap's ~4.3K-token
# vocabulary, and the launches, not the arithmetic, would set the loss's time. 64 MiB of
# logits per chunk keeps the chunks few (2 at 12K tokens) and the memory far below eager's
# (~10-14 bytes per logit there: the logits, their fp32 copy, the log-softmax, gradients).
MIN_CHUNK_BYTES = 64 << 20


def _default_chunk(n: int, d: int, v: int, itemsize: int, models: int = 1) -> int:
    """Rows per chunk (per model): a chunk's logits (models x chunk x V) about the size of x
    (models x n x D), but at least MIN_CHUNK_BYTES of them, and at most all n rows."""
    by_x = triton.cdiv(n * d, v)
    floor = triton.cdiv(MIN_CHUNK_BYTES, models * v * itemsize)
    return max(1, min(n, max(by_x, floor)))


def _forward(x, weight, targets, bias, ignore_index, chunk, grads: bool):
    """x (M, N, D), weight (M, V, D), targets (M, N), bias (M, V) or None: M models' losses
    (M,) fp32 and, if ``grads``, their gradients, every model in the same launches."""
    models, n, d = x.shape
    v = weight.shape[1]
    valid = (targets != ignore_index).sum(1)
    inv_n = 1.0 / valid.clamp(min=1).float()  # (M,), on the device: no sync
    losses = torch.empty((models, n), dtype=torch.float32, device=x.device)
    grad_x = torch.empty((models, n, d), dtype=x.dtype, device=x.device) if grads else None
    grad_w = torch.zeros(models, v, d, dtype=torch.float32, device=x.device) if grads else None
    grad_b = (torch.zeros(models, v, dtype=torch.float32, device=x.device)
              if grads and bias is not None else None)
    for lo in range(0, n, chunk):
        xc = x[:, lo:lo + chunk]
        logits = torch.bmm(xc, weight.transpose(1, 2))  # (M, C, V), contiguous
        if bias is not None:
            logits += bias[:, None]
        rows = logits.shape[1]
        tc, lc = targets[:, lo:lo + chunk], losses[:, lo:lo + chunk]
        _ce_rows[(models * rows,)](logits, v, tc, tc.stride(0), lc, lc.stride(0), inv_n, rows, v,
                                   ignore_index, BLOCK_V=_block_v(v), WRITE_GRAD=grads)
        if not grads:
            continue
        torch.bmm(logits, weight, out=grad_x[:, lo:lo + chunk])  # logits now hold their gradient
        grad_w += torch.bmm(logits.transpose(1, 2), xc).float()
        if grad_b is not None:
            grad_b += logits.float().sum(1)
    # every ignored row is 0, so the sum over rows / n_valid is the mean over valid targets
    loss = losses.sum(1) * inv_n
    if not grads:
        return loss, None, None, None
    return loss, grad_x, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype)


@torch.library.custom_op("kcap::linear_cross_entropy", mutates_args=())
def _lce(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
         ignore_index: int, chunk: int, grads: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses (M,), dx, dW, db) with empty tensors for the gradients not computed."""
    loss, gx, gw, gb = _forward(x, weight, targets, bias, ignore_index, chunk, grads)
    return loss, *(g if g is not None else x.new_empty(0) for g in (gx, gw, gb))


@_lce.register_fake
def _lce_fake(x, weight, bias, targets, ignore_index, chunk, grads):
    return (x.new_empty(x.shape[:1], dtype=torch.float32),
            torch.empty_like(x) if grads else x.new_empty(0),
            torch.empty_like(weight) if grads else x.new_empty(0),
            torch.empty_like(bias) if grads and bias is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.has_bias = inputs[2] is not None


def _backward(ctx, grad_loss, _dx, _dw, _db):
    gx, gw, gb = ctx.saved_tensors
    g = grad_loss[:, None]  # (M, 1): each model's gradients scale by its own loss's
    return (gx * g[:, :, None].to(gx.dtype), gw * g[:, :, None].to(gw.dtype),
            gb * g.to(gb.dtype) if ctx.has_bias else None, None, None, None, None)


_lce.register_autograd(_backward, setup_context=_setup)


def _checked(x, weight, targets, bias, chunk, stacked: bool) -> int:
    """Validate (M leading in every tensor if ``stacked``); return the rows per chunk."""
    lead, shape = ("M, ", "M x ") if stacked else ("", "")
    dims = 3 if stacked else 2
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, targets)):
        raise TypeError("x, weight and targets must be tensors")
    if (x.ndim != dims or weight.ndim != dims or x.shape[-1] != weight.shape[-1]
            or x.shape[:-2] != weight.shape[:-2]):
        raise ValueError(f"x must be ({lead}N, D) and weight ({lead}V, D) with the same "
                         f"{shape}D, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.shape != x.shape[:-1] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be ({lead}N) = {tuple(x.shape[:-1])} int64, got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one dtype of {DTYPES}, got {x.dtype} and "
                         f"{weight.dtype}")
    if bias is not None and (bias.shape != weight.shape[:-1] or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {tuple(weight.shape[:-1])} {x.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if x.numel() == 0 or weight.numel() == 0:
        raise ValueError("x and weight must have at least one row each (and one model)")
    check_device(*[t for t in (x, weight, targets, bias) if t is not None])
    models = x.shape[0] if stacked else 1
    return chunk or _default_chunk(x.shape[-2], x.shape[-1], weight.shape[-2], x.element_size(),
                                   models)


def _wants_grads(*tensors) -> bool:
    """Gradients are computed in the forward pass: only when autograd will ask for them."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100,
                         chunk: int | None = None):
    """Mean cross-entropy of ``x @ weight.T + bias`` against ``targets`` (see the module
    docstring); x (N, D), weight (V, D), bias (V,) or None, targets (N,) int64."""
    chunk = _checked(x, weight, targets, bias, chunk, stacked=False)
    return _lce(x.contiguous()[None], weight.contiguous()[None], None if bias is None else bias[None],
                targets.contiguous()[None], ignore_index, chunk,
                _wants_grads(x, weight, bias))[0][0]


def stacked_linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100,
                                 chunk: int | None = None):
    """M models' losses at once (a pack, kcap.pack): x (M, N, D), weight (M, V, D), bias
    (M, V) or None, targets (M, N) int64 -> (M,) fp32, model i's mean cross-entropy of
    ``x[i] @ weight[i].T + bias[i]`` over its targets that are not ``ignore_index`` (0,
    with zero gradients, where it has none). One set of launches per chunk for all models
    (batched matmuls, one row kernel), where M calls of ``linear_cross_entropy`` would
    launch M times as many; ``chunk`` is rows per model."""
    chunk = _checked(x, weight, targets, bias, chunk, stacked=True)
    return _lce(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                targets.contiguous(), ignore_index, chunk, _wants_grads(x, weight, bias))[0]


def linear_cross_entropy_reference(x, weight, targets, bias=None, ignore_index: int = -100):
    """The plain PyTorch definition: logits in x's dtype, the loss in fp32 (as kcap's models)."""
    logits = F.linear(x, weight, bias)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
