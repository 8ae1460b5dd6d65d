"""Packed formats (round trips, error bounds) and the W8A16 / W4A16 kernels against the
exact (fp64) x @ dequant(W).T under the error rule of precision.py (see test_attention), and
broken variants the rule must reject."""
import pytest
import torch

from kcap.kernels import quant_matmul as Q
from kcap.kernels import quant_pack as qp
from kcap.kernels.quant_matmul import int4_matmul, int8_matmul, quant_matmul_reference
from kcap.kernels.runtime import INTERPRET, pinned

from . import rounded_references as R
from .precision import EXACT, assert_within_rule, at, margin, round_to_tf32

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def test_int4_pack_round_trip_and_layout():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = qp.pack_int4(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # low nibble first
    assert torch.equal(qp.unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        qp.pack_int4(codes[:, :5])


def test_int8_round_trip_error_bound():
    w = torch.randn(33, 70)
    q, s = qp.quantize_int8(w)
    err = (qp.dequantize_int8(q, s) - w).abs()
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (err <= s[:, None] / 2 + 1e-7).all()  # round to nearest: half a step
    assert (qp.dequantize_int8(*qp.quantize_int8(torch.zeros(2, 4))) == 0).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_error_bound(group):
    w = torch.randn(9, 256) * torch.linspace(0.1, 3, 256)
    q, s, z = qp.quantize_int4(w, group)
    assert q.shape == (9, 128) and s.shape == z.shape == (9, 256 // group)
    back = qp.dequantize_int4(q, s, z, group)
    step = s.repeat_interleave(group, 1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="divisible"):
        qp.quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="group_size must be"):
        qp.quantize_int4(w, 16)


needs_kernels = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
SHAPES = [(1, 33, 256), (5, 100, 128), (16, 64, 384), (17, 40, 128), (70, 96, 256)]  # (M, N, K)


def _problem(kind, M, N, K, dtype, group=64, bias=True):
    """x (M, K), the packed weight of a random (N, K) one, bias (N,) or None, and the kernel:
    run(x, bias) -> (M, N)."""
    g = torch.Generator().manual_seed(M * 1000 + N)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    b = (torch.randn(N, generator=g) * 0.1).to(DEVICE, dtype) if bias else None
    if kind == 8:
        packed = [t.to(DEVICE) for t in qp.quantize_int8(w)]
        return x, packed, b, lambda x, b: int8_matmul(x, *packed, bias=b)
    packed = [t.to(DEVICE) for t in qp.quantize_int4(w, group)]
    return x, packed, b, lambda x, b: int4_matmul(x, *packed, group, bias=b)


def _references(x, packed, b, group):
    """(exact, model, magnitude) of the error rule for y = x @ dequant(W).T + b."""
    if len(packed) == 2:  # int8: one scale per output channel, over all of K
        codes, scales, group = packed[0], packed[1][:, None], x.shape[1]
    else:
        q, scales, zeros = packed
        codes = qp.unpack_int4(q).int() - zeros.int().repeat_interleave(group, 1)
    exact, magnitude = R.quant_matmul(x, codes, scales, group, b, EXACT, magnitudes=True)
    return exact, R.quant_matmul(x, codes, scales, group, b, at(x.dtype)), magnitude


def _check(kind, M, N, K, dtype, group=64, bias=True):
    x, packed, b, run = _problem(kind, M, N, K, dtype, group, bias)
    kern = run(x, b)
    assert kern.shape == (M, N) and kern.dtype == dtype
    exact, model, magnitude = _references(x, packed, b, group)
    assert_within_rule({"y": kern}, {"y": exact}, {"y": model}, {"y": magnitude})
    reference = quant_matmul_reference(x, *packed, bias=b) if kind == 8 else \
        quant_matmul_reference(x, *packed, group_size=group, bias=b)
    wd = qp.dequantize_int8(*packed) if kind == 8 else qp.dequantize_int4(*packed, group)
    assert torch.equal(reference, (x.float() @ wd.t() + (b.float() if bias else 0)).to(dtype))


@pytest.mark.parametrize("kind", [8, 4], ids=["int8", "int4"])
def test_exact_reference_is_the_dequantized_matmul(kind):
    """The fp64 formula the rule measures against is x @ dequant(W).T + b (quant_pack's
    dequantization rounds each weight to fp32, hence the 1e-6)."""
    x, packed, b, _ = _problem(kind, 5, 100, 128, torch.float32)
    wd = qp.dequantize_int8(*packed) if kind == 8 else qp.dequantize_int4(*packed, 64)
    exact = _references(x, packed, b, 64)[0]
    torch.testing.assert_close(exact, x.double() @ wd.double().t() + b.double(), rtol=1e-6, atol=1e-6)


def _row_off(y):
    y = y.clone()
    y[0] *= 1 + 1e-4
    return y


# Each must fail the rule (measured in fp32: by >= 49x).
BROKEN = {
    "tf32 inputs": lambda x, b, run: run(round_to_tf32(x), b),
    "bias dropped": lambda x, b, run: run(x, torch.zeros_like(b)),
    "one row off by 1e-4": lambda x, b, run: _row_off(run(x, b)),
}


@needs_kernels
@pytest.mark.parametrize("M", [5, 70], ids=["split-k", "tiled"])
@pytest.mark.parametrize("kind", [8, 4], ids=["int8", "int4"])
@pytest.mark.parametrize("bug", BROKEN)
def test_rule_rejects_broken_kernel(bug, kind, M):
    x, packed, b, run = _problem(kind, M, 100, 256, torch.float32)
    assert margin(BROKEN[bug](x, b, run), *_references(x, packed, b, 64)) > 1


@needs_kernels
@pytest.mark.parametrize("M, N, K", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("kind", [8, 4], ids=["int8", "int4"])
def test_kernels_match_reference(kind, M, N, K, dtype):
    _check(kind, M, N, K, dtype, group=64 if K % 64 == 0 else 32)


@needs_kernels
@pytest.mark.parametrize("group", [32, 128])
def test_int4_group_sizes_and_no_bias(group):
    _check(4, 3, 40, 256, torch.float16, group=group, bias=False)
    _check(4, 33, 40, 256, torch.float16, group=group, bias=False)


@pytest.mark.skipif(not CUDA, reason="bf16 is only right on a GPU")
@pytest.mark.parametrize("M, N, K", SHAPES + [(1, 4096, 4096), (4096, 4096, 4096)], ids=str)
@pytest.mark.parametrize("kind", [8, 4])
def test_kernels_bf16_gpu(kind, M, N, K):
    _check(kind, M, N, K, torch.bfloat16, group=128 if K % 128 == 0 else 64)


@needs_kernels
@pytest.mark.parametrize("M", [5, 40], ids=["split-k", "tiled"])
@pytest.mark.parametrize("kind", [8, 4], ids=["int8", "int4"])
def test_gradients_reach_x_and_bias(kind, M):
    """dx = dy @ dequant(W) and db = sum(dy), within fp32's rounding bound for sums of N
    terms (gamma_N * |dy| @ |W|, whatever the order); the weight takes none. Before, the
    kernels' output had no gradient at all, so LoRA over a quantized model lost every path
    through the quantized layers on a GPU."""
    x, packed, b, run = _problem(kind, M, 100, 256, torch.float32)
    x.requires_grad_(True)
    b.requires_grad_(True)
    dy = torch.randn(M, 100, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    run(x, b).backward(dy)
    wd = (qp.dequantize_int8(*packed) if kind == 8 else qp.dequantize_int4(*packed, 64)).double()
    gamma = 100 * 2.0 ** -24 / (1 - 100 * 2.0 ** -24)
    bound = gamma * (dy.double().abs() @ wd.abs())
    assert ((x.grad.double() - dy.double() @ wd).abs() <= bound).all()
    assert ((b.grad.double() - dy.double().sum(0)).abs() <= gamma * dy.double().abs().sum(0)).all()
    with torch.no_grad():
        assert not run(x, b).requires_grad


@needs_kernels
def test_leading_dims_and_bad_input():
    w = torch.randn(40, 128)
    q8, s8 = (t.to(DEVICE) for t in qp.quantize_int8(w))
    x = torch.randn(2, 3, 128, device=DEVICE)
    assert int8_matmul(x, q8, s8).shape == (2, 3, 40)
    with pytest.raises(ValueError, match="features"):
        int8_matmul(torch.randn(2, 64, device=DEVICE), q8, s8)
    with pytest.raises(TypeError, match="int8"):
        int8_matmul(x, q8.float(), s8)
    with pytest.raises(TypeError, match="float16"):
        int8_matmul(x.double(), q8, s8)
    with pytest.raises(ValueError, match="scale must be"):
        int8_matmul(x, q8, s8[:5])
    q4, s4, z4 = (t.to(DEVICE) for t in qp.quantize_int4(w, 64))
    with pytest.raises(ValueError, match="group_size"):
        int4_matmul(x, q4, s4, z4, 48)
    with pytest.raises(ValueError, match="zeros must be"):
        int4_matmul(x, q4, s4, z4.float().to(torch.uint8)[:, :1], 64)


@needs_kernels
@pytest.mark.parametrize("which, index", [("small", i) for i in range(len(Q.SMALL_CANDIDATES))] +
                         [("large", i) for i in range(len(Q.LARGE_CANDIDATES))])
def test_every_autotune_candidate(which, index):
    """Each candidate alone: the small-M (split-K) kernel serves M <= 16 (int4 only in fp32:
    fp16/bf16 go to w4a16_decode, tested in test_w4a16_decode), the tiled one larger M."""
    kernel, candidates, M = ((Q._wq_small, Q.SMALL_CANDIDATES, 5) if which == "small" else
                             (Q._wq_large, Q.LARGE_CANDIDATES, 70))
    with pinned((kernel, candidates[index])):
        for dtype in [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else []):
            for kind in (8, 4):
                _check(kind, M, 100, 256, dtype, group=64)
                if CUDA:  # a wider case, still on the same path
                    _check(kind, 12 if which == "small" else 280, 300, 1024, dtype, group=128)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else []), ids=str)
@pytest.mark.parametrize("kind, group", [(8, 0), (4, 32), (4, 128)])
def test_dequantize_kernel_is_exact(kind, group, dtype):
    """The large-M path's Triton dequantization equals quant_pack's, bit for bit."""
    w = torch.randn(33, 256, generator=torch.Generator().manual_seed(group))
    if kind == 8:
        q, s = (t.to(DEVICE) for t in qp.quantize_int8(w))
        got, want = Q._dequantize(q, s, None, 8, 0, 33, 256, dtype), qp.dequantize_int8(q, s, dtype)
    else:
        q, s, z = (t.to(DEVICE) for t in qp.quantize_int4(w, group))
        got = Q._dequantize(q, s, z, 4, group, 33, 256, dtype)
        want = qp.dequantize_int4(q, s, z, group, dtype)
    assert got.dtype == dtype and torch.equal(got, want)


class _Unused:
    def __getitem__(self, grid):
        raise AssertionError("the tiled kernel ran where dequantize + matmul was expected")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_large_m_dequantizes_then_matmuls(monkeypatch, dtype):
    monkeypatch.setattr(Q, "DEQUANT_MIN_M", 17)  # the real threshold, at interpreter cost
    monkeypatch.setattr(Q, "_wq_large", _Unused())
    for kind in (8, 4):
        _check(kind, 40, 100, 256, dtype)
        _check(kind, 17, 33, 128, dtype, group=32, bias=False)
