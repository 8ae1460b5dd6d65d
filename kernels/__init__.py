"""Triton kernels, imported as ``kcap.kernels``.

This package depends on torch and triton only (never on the rest of kcap), so that a kernel
file can be lifted into another project with ``runtime.py`` beside it. Kernels so far:
``flash_attention`` (forward and backward, causal, grouped-query) and ``fused_mlp`` /
``GatedMLP`` (gated SiLU, GELU or SiLU MLPs with the activation in the matmul epilogues);
``split_mlp``, the same MLP on cuBLAS GEMMs around one elementwise kernel.
``grouped_linear`` is the MoE experts' grouped GEMM; ``quant_matmul`` holds the weight-only
int8/int4 matmuls (formats in ``quant_pack``; int4 with fp16/bf16
activations in ``w4a16``); ``linear_cross_entropy`` is the LM head and
its cross-entropy fused (the logits never exist for the whole batch), and
``stacked_linear_cross_entropy`` the same for M models at once (a pack).
"""
from .attention import attention_reference, flash_attention
from .cross_entropy import (linear_cross_entropy, linear_cross_entropy_reference,
                            stacked_linear_cross_entropy)
from .gated_mlp import GatedMLP, fused_mlp, mlp_reference
from .grouped_gemm import grouped_linear, grouped_linear_reference
from .mlp_elementwise import split_mlp

__all__ = ["flash_attention", "attention_reference", "fused_mlp", "mlp_reference", "GatedMLP",
           "split_mlp", "grouped_linear", "grouped_linear_reference", "linear_cross_entropy",
           "linear_cross_entropy_reference", "stacked_linear_cross_entropy"]
