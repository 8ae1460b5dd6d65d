"""Triton kernels, imported as ``kcap.kernels``.

This package depends on torch and triton only (never on the rest of kcap), so that a kernel
file can be lifted into another project as it is. The kernels land with their issues:
flash attention, the fused gated MLP, weight-only int8/int4 matmuls and the MoE grouped GEMM.
"""
