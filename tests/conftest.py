"""Test-wide settings.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
first: the Triton kernels then run on CPU tensors through the interpreter.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
