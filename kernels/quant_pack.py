"""Weight-only quantized formats: int8 per output channel, int4 per group. torch only.

int8 (symmetric, per output channel): ``qweight`` (N, K) int8 in [-127, 127] and ``scale``
(N,) float32 with W[n, k] ~= qweight[n, k] * scale[n]; scale = max|W[n, :]| / 127.

int4 (asymmetric, groups of G consecutive inputs, G in {32, 64, 128}; K % G == 0):
``qweight`` (N, K // 2) uint8 holding two 4-bit codes per byte along K, **low nibble first**
(byte j of row n holds k = 2j in bits 0-3 and k = 2j + 1 in bits 4-7), codes q in [0, 15];
``scales`` (N, K // G) float32 and ``zeros`` (N, K // G) uint8 in [0, 15] with
W[n, k] ~= (q[n, k] - zeros[n, k // G]) * scales[n, k // G]. Round-to-nearest maps each
group's [min, max] (widened to include 0) onto [0, 15].

Zero-width rows get scale 1 so that dequantization never divides by zero.
"""
from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128)


def _check_weight(w: torch.Tensor):
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise ValueError(f"weight must be a 2-d tensor (out_features, in_features), got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    if not w.is_floating_point():
        raise TypeError(f"weight must be floating point, got {w.dtype}")


def check_group_size(k: int, group_size: int):
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"in_features ({k}) must be divisible by group_size ({group_size})")


def int8_scale(w: torch.Tensor) -> torch.Tensor:
    """(N,) float32 symmetric per-row scales of a weight (N, K)."""
    amax = w.detach().float().abs().amax(dim=1)
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


def quantize_int8(w: torch.Tensor, scale: torch.Tensor | None = None):
    """Round-to-nearest int8: (qweight (N, K) int8, scale (N,) float32)."""
    _check_weight(w)
    scale = int8_scale(w) if scale is None else scale.float()
    q = torch.clamp(torch.round(w.float() / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (qweight.float() * scale.float()[:, None]).to(dtype)


def int4_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 of rows w (..., G): [min, max] (with 0 inside) onto [0, 15]."""
    w = w.float()
    lo = torch.clamp(w.amin(dim=-1), max=0.0)
    hi = torch.clamp(w.amax(dim=-1), min=0.0)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    return scale, zero


def quantize_int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (same shape as w) for per-element broadcastable scale and zero."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 15)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integer codes in [0, 15] -> (N, K // 2) uint8, low nibble first."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K // 2) uint8 -> (N, K) uint8 codes."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


def quantize_int4(w: torch.Tensor, group_size: int = 128):
    """Round-to-nearest int4: (qweight (N, K//2) uint8, scales (N, K//G), zeros (N, K//G) uint8)."""
    _check_weight(w)
    N, K = w.shape
    check_group_size(K, group_size)
    groups = w.detach().float().reshape(N, K // group_size, group_size)  # data, not a graph
    scale, zero = int4_params(groups)
    codes = quantize_int4_codes(groups, scale[..., None], zero[..., None]).reshape(N, K)
    return pack_int4(codes), scale, zero.to(torch.uint8)


def dequantize_int4(qweight, scales, zeros, group_size: int, dtype=torch.float32) -> torch.Tensor:
    codes = unpack_int4(qweight).float()
    N, K = codes.shape
    g = codes.reshape(N, K // group_size, group_size)
    w = (g - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(N, K).to(dtype)
