"""The kernels' error rule, and the arithmetic of the reference it is built from.

**Why not torch's own error.** The rule used to be "the kernel's error is at most twice
torch's own error at that precision". torch's fp32/fp16 error comes from BLAS and Sleef code
paths that differ between CPUs (blocking, vector width, FMA), so the bound moved with the host
and failed on some (issue 11). Under ``TRITON_INTERPRET=1`` even ``tl.dot`` is a numpy
(OpenBLAS) matmul, so the kernel's own error moves a little too: the rule needs real margin.

**The rule** (``error_bound``), for each output tensor of a kernel::

    max|kernel - exact| <= 2 * max|model - exact|
                           + ulp(output dtype) * max|exact|
                           + ulp(fp32) * max(magnitude)

- ``exact`` is the computation in fp64 (``EXACT``): the "true" answer for the given inputs.
- ``model`` is the same formulas at the test precision (``at(dtype)``) with every rounding
  specified: products and sums one at a time in fp32, sums in index order (no FMA, no BLAS,
  no tree reductions), transcendental functions in fp64 rounded once to fp32, and the
  rounding to the storage dtype exactly where a GPU kernel rounds (inputs, outputs, the
  operands it casts before a dot). Elementwise IEEE operations give the same bits on every
  CPU and GPU (fp64 exp/erf may differ in their last fp64 bit between libraries, which moves
  an fp32 rounding with odds ~2^-29), so ``max|model - exact|`` is a deterministic function
  of the inputs; it captures the conditioning of the problem and how errors grow with the
  reduction length.
  A sequential sum is the textbook worst-ordered algorithm (its error grows like that of the
  longest chain of additions), so a blocked kernel is typically *more* accurate; the factor
  2 leaves room for its different order and for a GPU's approximate exp2 and division.
- ``ulp(output dtype) * max|exact|``: the final rounding of the store, which the kernel and
  the model may round to neighbouring values.
- ``magnitude`` is the absolute-value version of the computation (``|A| @ |B|`` for a
  product summed, ``|a| + |b|`` for a sum or difference, ``|f(a)|`` for an elementwise
  function): the scale of the terms behind each output. One fp32 ulp of it is one rounding
  at the scale of those terms, which two evaluation orders may always differ by even where
  the model happens to be exact: attention with one key has dQ = dK = 0 exactly in the
  model and the reference (O = V, so dP - delta cancels to 0) while any other summation
  order of dP and delta leaves ~1e-7 (a bound of u * max|exact| alone would be 0 there).

**Margins measured** (kernel error / bound, worst output of every rule check in
tests/kernels: ``KCAP_MARGIN_LOG=margins.jsonl pytest tests/kernels`` records them), in the
interpreter on a 2-core x86 CPU: worst 0.46 (attention fp32 dV); by kernel and dtype,
attention 0.25 (fp16) / 0.46 (fp32), fused MLP 0.34 / 0.37, grouped GEMM 0.24 / 0.31,
quantized matmul 0.26 / 0.28, linear cross-entropy 0.50 (worst of fp16 and fp32, its loss). The same to the last digit at OMP_NUM_THREADS=1 and 2, under
triton 3.6.0 (numpy 2.3.5) and 3.9.0 (numpy 2.4.6). The kernels' errors are ~0.5-1 u of the
output scale in fp16 (the interpreter upcasts tiles, so only the stores round) and ~1-13 u in
fp32, the model's alike (u: the unit roundoff, ``UNIT_ROUNDOFF``).
``test_rule_rejects_broken_kernel`` in each test file checks that broken kernels (TF32
inputs, a softmax scale off by 1e-3, a causal mask off by one key, an output or one row off
by 1e-4, a bias dropped) fail this same rule: measured by 20x (one MLP row off by 1e-4) to
1e6x.

**On a GPU** (not yet run with this rule): the model rounds where the GPU kernels do (P
and dS to the input dtype before their dots), so fp16/bf16 kernels there carry the roundings
the model already counts; fp32 dots are IEEE FMAs (more accurate than the model's separate
products), while exp2 and division are approximate (<= 2 ulp) and cuBLAS may reduce split-K
partial sums in fp16/bf16 (torch's default); the factor 2 and the floors are meant to cover
these, and the first GPU session should record the margins it finds.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch

# Unit roundoff u (half the spacing of floats just above 1); one ulp is 2u.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}


def ulp(dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s floats in [1, 2)."""
    if dtype not in UNIT_ROUNDOFF:
        raise TypeError(f"dtype must be one of {sorted(map(str, UNIT_ROUNDOFF))}, got {dtype}")
    return 2 * UNIT_ROUNDOFF[dtype]


@contextlib.contextmanager
def _one_thread():
    """The sequential loops run thousands of small elementwise ops: threads gain nothing
    there, and each parallel region's barrier costs ~10 ms on a loaded 2-core host. Thread
    counts never change an elementwise IEEE result."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Precision:
    """Where a computation rounds: ``store`` is the dtype of the kernel's inputs, outputs and
    the operands it casts before a dot; ``acc`` the dtype every arithmetic operation rounds
    to (fp32, as the kernels' accumulators; fp64 for the exact reference). All helpers take
    and return tensors in ``acc`` (values already representable in ``store`` where rounded).
    """

    store: torch.dtype
    acc: torch.dtype

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded to the storage dtype (to nearest even), held in ``acc``."""
        return x.to(self.store).to(self.acc)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """An input (already in the storage dtype) in ``acc``: exact."""
        return x.to(self.acc)

    def scalar(self, value: float) -> torch.Tensor:
        """A Python float as the 0-d ``acc`` tensor a kernel's scalar argument becomes."""
        return torch.tensor(value, dtype=self.acc)

    def fn(self, f, x: torch.Tensor) -> torch.Tensor:
        """A transcendental function: evaluated in fp64, rounded once to ``acc``."""
        return f(x.to(torch.float64)).to(self.acc)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a (..., M, K) @ b (..., K, N) (batch dims broadcast) -> (..., M, N) in ``acc``:
        one product and one addition at a time, k ascending, each rounded to ``acc``."""
        a, b = a.to(self.acc), b.to(self.acc)
        with _one_thread():
            out = a[..., :, :1] * b[..., :1, :]
            for k in range(1, a.shape[-1]):
                out = out + a[..., :, k:k + 1] * b[..., k:k + 1, :]
        return out

    def sum(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x summed over ``dim`` (dropped) in ``acc``, in index order."""
        x = x.to(self.acc).movedim(dim, 0)
        with _one_thread():
            out = x[0]
            for i in range(1, x.shape[0]):
                out = out + x[i]
        return out


EXACT = Precision(torch.float64, torch.float64)


def at(dtype: torch.dtype) -> Precision:
    """The kernels' precision for ``dtype`` inputs: stored in dtype, computed in fp32."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return Precision(dtype, torch.float32)


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded to TF32's 10 mantissa bits (to nearest even), as a TF32 dot reads it:
    the tests' stand-in for a kernel that runs its fp32 dots as TF32."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"x must be a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0xFFF + ((bits >> 13) & 1)) & -0x2000).view(torch.float32)


def magnitude_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a| @ |b| in fp64: the summed magnitudes of a matmul's terms (host-dependent only at
    fp64 rounding level, far below what it bounds)."""
    return a.double().abs() @ b.double().abs()


def error_bound(exact: torch.Tensor, model: torch.Tensor, magnitude: torch.Tensor,
                dtype: torch.dtype) -> float:
    """The rule's bound on max|kernel - exact| for one output tensor stored in ``dtype``:
    2 max|model - exact| + ulp(dtype) max|exact| + ulp(fp32) max(magnitude)."""
    for name, t in (("exact", exact), ("model", model), ("magnitude", magnitude)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if model.shape != exact.shape or magnitude.shape != exact.shape:
        raise ValueError(f"model {tuple(model.shape)} and magnitude {tuple(magnitude.shape)} "
                         f"must have exact's shape {tuple(exact.shape)}")
    if exact.numel() == 0:
        return 0.0
    exact = exact.double()
    model_error = (model.double() - exact).abs().max().item()
    return (2 * model_error + ulp(dtype) * exact.abs().max().item()
            + ulp(torch.float32) * magnitude.double().abs().max().item())


def margin(got: torch.Tensor, exact: torch.Tensor, model: torch.Tensor,
           magnitude: torch.Tensor) -> float:
    """max|got - exact| / error_bound (the rule holds iff <= 1); got's dtype is the storage
    dtype. 0 when both are 0, inf when only the bound is."""
    if not isinstance(got, torch.Tensor):
        raise TypeError(f"got must be a torch.Tensor, got {type(got).__name__}")
    if got.shape != exact.shape:
        raise ValueError(f"got has shape {tuple(got.shape)}, exact {tuple(exact.shape)}")
    bound = error_bound(exact, model, magnitude, got.dtype)
    if got.numel() == 0:
        return 0.0
    error = (got.detach().double() - exact.double()).abs().max().item()
    if bound == 0:
        return 0.0 if error == 0 else float("inf")
    return error / bound


def margins(got: dict, exact: dict, model: dict, magnitude: dict) -> dict:
    """{name: margin} for every tensor of ``exact`` (each dict maps output name -> tensor)."""
    missing = [name for name in exact if name not in got or name not in model or name not in magnitude]
    if missing:
        raise ValueError(f"got, model and magnitude must hold every output of exact; missing {missing}")
    return {name: margin(got[name], exact[name], model[name], magnitude[name]) for name in exact}


def assert_within_rule(got: dict, exact: dict, model: dict, magnitude: dict) -> dict:
    """Assert that every output keeps the rule (margin <= 1); returns the margins."""
    found = margins(got, exact, model, magnitude)
    if os.environ.get("KCAP_MARGIN_LOG"):  # how the docstring's margins were measured
        with open(os.environ["KCAP_MARGIN_LOG"], "a") as log:
            log.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""),
                                  "dtype": str(next(iter(got.values())).dtype), **found}) + "\n")
    broken = {name: m for name, m in found.items() if not m <= 1}
    assert not broken, f"kernel error over the bound (margin > 1) for {broken}; all: {found}"
    return found
