"""The one place that knows whether Triton runs for real or in its CPU interpreter.

Under ``TRITON_INTERPRET=1`` kernels run on CPU tensors, but the interpreter gets bf16 math
and bf16 ``tl.dot`` wrong and fails to autotune over several configs. So, when
interpreting: tiles are upcast to fp32 right after loading (``UPCAST``), autotuning keeps
its first config, and CPU tensors are accepted. On a GPU none of this applies.
"""
from __future__ import annotations

import contextlib
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
UPCAST = INTERPRET


# KCAP_AUTOTUNE=0 keeps the first config on a GPU too: each new shape then compiles one
# kernel instead of timing every candidate (the GPU tests run many small shapes).
AUTOTUNE = os.environ.get("KCAP_AUTOTUNE", "1") != "0"
# KCAP_TRIAL_CANDIDATES=1 adds each kernel's trial candidates to its autotuning list: configs
# that look better offline (bench/registers.py) but have not yet passed the GPU tests alone.
# A candidate that computes a wrong answer on the GPU hides behind autotuning, so trials
# stay out of users' runs until `bench/gpu_session.sh tuning` has tested and timed them.
TRIAL = os.environ.get("KCAP_TRIAL_CANDIDATES", "0") == "1"
_TRIAL_IDS: set[int] = set()


def configs(candidates: list, trials: list = ()) -> list:
    """Autotuning candidates (with ``trials`` under KCAP_TRIAL_CANDIDATES=1), or only the
    first one (interpreter, or KCAP_AUTOTUNE=0)."""
    _TRIAL_IDS.update(map(id, trials))
    if INTERPRET or not AUTOTUNE:
        return candidates[:1]
    return candidates + list(trials) if TRIAL else list(candidates)


def is_trial(cfg) -> bool:
    """Whether ``cfg`` came from a kernel's trial list (see ``configs``)."""
    return id(cfg) in _TRIAL_IDS


def describe(cfg) -> str:
    """A config in a table cell: "BLOCK_M=64 BLOCK_N=64, 4 warps, 2 stages"."""
    blocks = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{blocks}, {cfg.num_warps} warps, {cfg.num_stages} stages" + (" (trial)" if is_trial(cfg) else "")


def dot_precision(dtype) -> str:
    """``tl.dot``'s input_precision for operands of this dtype, following torch's own fp32
    matmul setting: full IEEE fp32 under torch's default ("highest"), TF32 once the user
    asks torch for it (``torch.set_float32_matmul_precision("high")``). Triton's default
    is TF32 regardless, which silently made fp32 kernels 1e-3-accurate where torch is exact.
    fp16/bf16 operands ignore it."""
    import torch

    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@contextlib.contextmanager
def pinned(*pairs):
    """Run autotuned kernels with one given config each: ``with pinned((kernel, cfg), ...):``.

    Autotuning times the candidates and keeps the fastest, so a candidate that computes a
    wrong answer only shows on the shapes where it wins; pinning checks each one directly."""
    saved = [(kernel, kernel.configs, kernel.cache) for kernel, _ in pairs]
    try:
        for kernel, cfg in pairs:
            kernel.configs, kernel.cache = [cfg], {}
        yield
    finally:
        for kernel, candidates, cache in saved:
            kernel.configs, kernel.cache = candidates, cache


def config(**kwargs) -> "triton.Config":
    """A triton.Config from keyword arguments (num_warps / num_stages split out)."""
    warps = kwargs.pop("num_warps", 4)
    stages = kwargs.pop("num_stages", 2)
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def vmapped_first(x, dim, n: int):
    """In a vmap rule: ``x`` with its vmapped dim ``dim`` moved first, (n, ...); an unmapped
    input (dim None) expanded to n; None stays None."""
    if x is None:
        return None
    return x.movedim(dim, 0) if dim is not None else x.expand(n, *x.shape)


def check_device(*tensors) -> None:
    """Kernels need CUDA tensors, or CPU tensors under the interpreter; one device for all."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"Triton kernels need CUDA tensors (got {device}); on CPU set "
                         "TRITON_INTERPRET=1 before importing triton to use the interpreter")
