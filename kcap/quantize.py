"""Post-training weight quantization of a model: round-to-nearest or GPTQ, int8 or int4.

Quantization is a module swap (gpt-fast style): every ``nn.Linear`` of the transformer
blocks (attention q/kv/proj, MLP gate/up/down) becomes a ``QuantLinear`` holding packed
weights (formats: kcap.kernels.quant_pack). Embeddings, the LM head, norms, MoE experts
(stacked tensors) and routers stay in floating point; ``include_head=True`` quantizes the
head as well (not when it is tied to the embedding).

GPTQ (Frantar et al. 2022), written here: layer by layer in forward order, the inputs of the
layer on calibration biographies (with the layers before it already quantized) give the
Hessian H = 2 X^T X / n; columns are quantized left to right and each one's error, scaled by
the inverse Hessian's Cholesky factor, is pushed onto the columns not yet quantized (blocks
of 128 columns, 1% dampening, natural column order; int4 group parameters are fitted when
the quantizer reaches the group, from the already-updated weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kcap.atomic import atomic_path, write_json
from kcap.kernels import quant_pack as qp

METHODS = ("rtn", "gptq")


class QuantLinear(nn.Module):
    """A Linear layer with int8 (per channel) or int4 (per group) weights.

    Buffers: int8: ``qweight`` (N, K) int8, ``scale`` (N,) float32; int4: ``qweight``
    (N, K/2) uint8, ``scale`` (N, K/G) float32, ``zeros`` (N, K/G) uint8; ``bias`` (N,) if
    any. forward uses the Triton kernels on CUDA (``impl='auto'``) and dequantize + matmul
    elsewhere.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128,
                 bias: bool = False, impl: str = "auto"):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4:
            qp.check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size, self.impl = (group_size if bits == 4 else 0), impl
        n, k = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(n))
        else:
            self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(n, k // group_size))
            self.register_buffer("zeros", torch.zeros(n, k // group_size, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(n) if bias else None)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        if self.bits == 8:
            return qp.dequantize_int8(self.qweight, self.scale, dtype)
        return qp.dequantize_int4(self.qweight, self.scale, self.zeros, self.group_size, dtype)

    def stored_bits(self) -> int:
        """Bits this layer occupies: codes, scales (fp32) and zero points (4 bits each)."""
        codes = self.out_features * self.in_features * self.bits
        extra = self.scale.numel() * 32 + (self.zeros.numel() * 4 if self.bits == 4 else 0)
        return codes + extra + (self.bias.numel() * 16 if self.bias is not None else 0)

    def forward(self, x):
        from kcap.models.config import resolve_impl

        bias = None if self.bias is None else self.bias.to(x.dtype)
        if resolve_impl(self.impl, x) == "triton":
            from kcap.kernels.quant_matmul import int4_matmul, int8_matmul
            if self.bits == 8:
                return int8_matmul(x, self.qweight, self.scale, bias)
            return int4_matmul(x, self.qweight, self.scale, self.zeros, self.group_size, bias)
        return F.linear(x, self.dequantized(x.dtype), bias)


def _fill(layer: QuantLinear, codes_or_q: torch.Tensor, scale, zeros=None):
    if layer.bits == 8:
        layer.qweight.copy_(codes_or_q)
    else:
        layer.qweight.copy_(qp.pack_int4(codes_or_q))
        layer.zeros.copy_(zeros.to(torch.uint8))
    layer.scale.copy_(scale)


def rtn(weight: torch.Tensor, layer: QuantLinear):
    """Round-to-nearest into ``layer``."""
    if layer.bits == 8:
        q, s = qp.quantize_int8(weight)
        _fill(layer, q, s)
    else:
        q, s, z = qp.quantize_int4(weight, layer.group_size)
        layer.qweight.copy_(q), layer.scale.copy_(s), layer.zeros.copy_(z)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, layer: QuantLinear, block: int = 128,
         damp: float = 0.01):
    """GPTQ of one weight (N, K) given its input Hessian (K, K), into ``layer``."""
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    G = layer.group_size
    scale8 = qp.int8_scale(W) if layer.bits == 8 else None
    if G and block % G:
        raise ValueError(f"block ({block}) must be a multiple of the group size ({G})")
    scales = torch.zeros(N, K // G if G else 1)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            w = W1[:, i]
            if layer.bits == 8:
                q = torch.clamp(torch.round(w / scale8), -127, 127) * scale8
            else:
                if col % G == 0:  # fit this group's grid on the updated weights
                    s, z = qp.int4_params(W1[:, i:i + G])  # blocks hold whole groups
                    scales[:, col // G], zeros[:, col // G] = s, z
                s, z = scales[:, col // G], zeros[:, col // G]
                q = (qp.quantize_int4_codes(w, s, z) - z) * s
            Q[:, col] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if layer.bits == 8:
        _fill(layer, torch.round(Q / scale8[:, None]).to(torch.int8), scale8)
    else:
        codes = qp.quantize_int4_codes(Q.reshape(N, K // G, G), scales[..., None], zeros[..., None])
        _fill(layer, codes.reshape(N, K), scales, zeros)


def target_layers(model, include_head: bool = False) -> list[str]:
    """Names of the Linear layers a quantization swaps, in forward order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and n.startswith("blocks.") and not n.endswith("router")]
    head = getattr(model, "lm_head", None)
    if include_head and head is not None and head.weight is not model.wte.weight:
        names.append("lm_head")
    return names


def _swap(model, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _hessian(model, layer: nn.Module, batches) -> torch.Tensor:
    K = layer.in_features
    H, count = torch.zeros(K, K), 0

    def hook(_, args):
        nonlocal H, count
        x = args[0].detach().float().reshape(-1, K)
        H += 2.0 * x.t().cpu() @ x.cpu()
        count += x.shape[0]

    handle = layer.register_forward_pre_hook(hook)
    with torch.no_grad():
        for ids in batches:
            model(ids)
    handle.remove()
    return H / max(count, 1)


@torch.no_grad()  # the buffers are data: none may keep the weights' autograd graph
def quantize_model(model, bits: int, method: str = "rtn", group_size: int = 128,
                   calibration=None, include_head: bool = False) -> tuple[list[str], dict]:
    """Swap the model's target Linear layers for QuantLinear in place.

    calibration: an iterable of (B, T) token-id batches (GPTQ only). Returns the names of the
    quantized layers and {name: reason} of those left in floating point (int4 needs the
    input width to be a multiple of the group size; e.g. LLaMA-l-1's 171-wide down projection).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gptq" and calibration is None:
        raise ValueError("GPTQ needs calibration batches")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and group_size not in qp.GROUP_SIZES:
        raise ValueError(f"group_size must be one of {qp.GROUP_SIZES}, got {group_size}")
    batches = list(calibration) if calibration is not None else []
    names, skipped = [], {}
    model.eval()
    for name in target_layers(model, include_head):
        lin = model.get_submodule(name)
        if bits == 4 and lin.in_features % group_size:
            skipped[name] = f"in_features {lin.in_features} is not a multiple of group_size {group_size}"
            continue
        names.append(name)
        q = QuantLinear(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None)
        q = q.to(lin.weight.device)
        if method == "rtn":
            rtn(lin.weight, q)
        else:
            gptq(lin.weight, _hessian(model, lin, batches), q)
        if lin.bias is not None:
            q.bias.copy_(lin.bias.detach().float())
        _swap(model, name, q)
    return names, skipped


def stored_bits(model, used_token_ids) -> int:
    """Bits of the parameters counted for capacity as stored: QuantLinear layers at their
    packed size, every other counted parameter at 16 bits (bf16/fp16 storage)."""
    from kcap.capacity import count_params

    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return 16 * count_params(model, used_token_ids, model.cfg.vocab_size) + sum(m.stored_bits() for m in quant)


def save_quantized(path, model, meta: dict):
    """Write ``path/model.safetensors`` (packed weights included) and ``path/quantized.json``."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    write_json(path / "quantized.json", meta)


def load_quantized(path, model) -> dict:
    """Swap in QuantLinear skeletons as recorded and load the saved tensors bit-exactly."""
    from safetensors.torch import load_model

    path = Path(path)
    meta = json.loads((path / "quantized.json").read_text())
    for name in meta["layers"]:
        lin = model.get_submodule(name)
        _swap(model, name, QuantLinear(lin.in_features, lin.out_features, meta["bits"],
                                       meta["group_size"], lin.bias is not None))
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not fit the model (missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]})")
    return meta
