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
def _ce_rows(logits_ptr, stride, targets_ptr, loss_ptr, inv_n_ptr, V, ignore_index,
             BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """Row r of the (C, V) logits: loss[r] (fp32) and, in place, the logits' gradient."""
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
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
    tl.store(loss_ptr + row, loss)
    if not WRITE_GRAD:
        return
    # pass 2: d(mean loss)/d logits = (softmax - onehot) / n_valid, over the logits
    scale = tl.where(ignored, 0.0, tl.load(inv_n_ptr))
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


def _default_chunk(n: int, d: int, v: int, itemsize: int) -> int:
    """Rows per chunk: a chunk's logits (chunk x V) about the size of x (n x D), but at least
    MIN_CHUNK_BYTES of them, and at most all n rows."""
    by_x = triton.cdiv(n * d, v)
    floor = triton.cdiv(MIN_CHUNK_BYTES, v * itemsize)
    return max(1, min(n, max(by_x, floor)))


def _forward(x, weight, targets, bias, ignore_index, chunk, grads: bool):
    n, d = x.shape
    v = weight.shape[0]
    valid = (targets != ignore_index).sum()
    inv_n = (1.0 / valid.clamp(min=1).float()).reshape(1)  # on the device: no sync
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    grad_x = torch.empty((n, d), dtype=x.dtype, device=x.device) if grads else None
    grad_w = torch.zeros(v, d, dtype=torch.float32, device=x.device) if grads else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=x.device) if grads and bias is not None \
        else None
    for lo in range(0, n, chunk):
        xc = x[lo:lo + chunk]
        logits = xc @ weight.t()
        if bias is not None:
            logits += bias
        rows = logits.shape[0]
        _ce_rows[(rows,)](logits, logits.stride(0), targets[lo:lo + chunk], losses[lo:lo + chunk],
                          inv_n, v, ignore_index, BLOCK_V=_block_v(v), WRITE_GRAD=grads)
        if not grads:
            continue
        torch.mm(logits, weight, out=grad_x[lo:lo + chunk])  # logits now hold their gradient
        grad_w += (logits.t() @ xc).float()
        if grad_b is not None:
            grad_b += logits.float().sum(0)
    # every ignored row is 0, so the sum over rows / n_valid is the mean over valid targets
    loss = losses.sum() * inv_n[0]
    if not grads:
        return loss, None, None, None
    return loss, grad_x, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype)


@torch.library.custom_op("kcap::linear_cross_entropy", mutates_args=())
def _lce(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
         ignore_index: int, chunk: int, grads: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dx, dW, db) with empty tensors for the gradients not computed."""
    loss, gx, gw, gb = _forward(x, weight, targets, bias, ignore_index, chunk, grads)
    return loss, *(g if g is not None else x.new_empty(0) for g in (gx, gw, gb))


@_lce.register_fake
def _lce_fake(x, weight, bias, targets, ignore_index, chunk, grads):
    return (x.new_empty((), dtype=torch.float32), torch.empty_like(x) if grads else x.new_empty(0),
            torch.empty_like(weight) if grads else x.new_empty(0),
            torch.empty_like(bias) if grads and bias is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.has_bias = inputs[2] is not None


def _backward(ctx, grad_loss, _dx, _dw, _db):
    gx, gw, gb = ctx.saved_tensors
    return (gx * grad_loss.to(gx.dtype), gw * grad_loss.to(gw.dtype),
            gb * grad_loss.to(gb.dtype) if ctx.has_bias else None, None, None, None, None)


_lce.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index: int = -100,
                         chunk: int | None = None):
    """Mean cross-entropy of ``x @ weight.T + bias`` against ``targets`` (see the module
    docstring); x (N, D), weight (V, D), bias (V,) or None, targets (N,) int64."""
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, targets)):
        raise TypeError("x, weight and targets must be tensors")
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (N, D) and weight (V, D) with the same D, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.shape != (x.shape[0],) or targets.dtype != torch.int64:
        raise ValueError(f"targets must be (N,) = ({x.shape[0]},) int64, got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share one dtype of {DTYPES}, got {x.dtype} and "
                         f"{weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be ({weight.shape[0]},) {x.dtype}, got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if x.shape[0] == 0 or weight.shape[0] == 0:
        raise ValueError("x and weight must have at least one row each")
    check_device(*[t for t in (x, weight, targets, bias) if t is not None])
    n, d = x.shape
    chunk = chunk or _default_chunk(n, d, weight.shape[0], x.element_size())
    # gradients are computed in the forward pass: only when autograd will ask for them
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (x, weight, bias))
    return _lce(x.contiguous(), weight.contiguous(), bias, targets.contiguous(), ignore_index,
                chunk, grads)[0]


def linear_cross_entropy_reference(x, weight, targets, bias=None, ignore_index: int = -100):
    """The plain PyTorch definition: logits in x's dtype, the loss in fp32 (as kcap's models)."""
    logits = F.linear(x, weight, bias)
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
