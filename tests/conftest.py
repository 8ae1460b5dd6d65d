"""Test-wide settings.

Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors: that needs
TRITON_INTERPRET=1 before any @triton.jit function is defined, so it is set here, first.
With a GPU, the kernels compile for it and the GPU-only tests (bf16, determinism) run.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # one config per kernel: autotuning every small test shape costs minutes of compiling
    # (KCAP_AUTOTUNE=1 tests the tuned path instead; the benchmarks always tune)
    os.environ.setdefault("KCAP_AUTOTUNE", "0")
