"""W4A16 with fp16/bf16 activations (kernels/w4a16.py) under the error rule of
precision.py, through int4_matmul as users call it: every candidate of both kernels alone
(split counts that leave empty slices, row and column tails), the one-launch split-K
reduction (same bits every call, its counters left at zero), and the fallbacks to the
general kernels."""
import pytest
import torch

from kcap.kernels import quant_matmul as Q
from kcap.kernels import quant_pack as qp
from kcap.kernels import w4a16 as W4
from kcap.kernels.runtime import INTERPRET, pinned

from .precision import assert_within_rule
from .test_quant_matmul import _check, _references, _Unused

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HALF = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]  # interpreter: no bf16
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")


class _Counting:
    """Stands in for an autotuned kernel: counts launches, then runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.mark.parametrize("index", range(len(W4.SPLIT_CANDIDATES)))
def test_every_split_candidate(index, monkeypatch):
    """Each candidate alone, on shapes where its split leaves some slices empty (K = 256 is
    4 groups of 64) and N is not a multiple of BLOCK_N; the general kernel must not run."""
    monkeypatch.setattr(Q, "_wq_small", _Unused())
    with pinned((W4._w4_split, W4.SPLIT_CANDIDATES[index])):
        for dtype in HALF:
            _check(4, 1, 100, 256, dtype, group=64)
            _check(4, 16, 33, 512, dtype, group=32, bias=False)
            if CUDA:  # a split with every slice busy, at a decode shape
                _check(4, 4, 300, 4096, dtype, group=128)


@pytest.mark.parametrize("index", range(len(W4.TILED_CANDIDATES)))
def test_every_tiled_candidate(index, monkeypatch):
    """Each candidate alone, M and N not multiples of its tiles; the general kernel must not
    run."""
    monkeypatch.setattr(Q, "_wq_large", _Unused())
    with pinned((W4._w4_tiled, W4.TILED_CANDIDATES[index])):
        for dtype in HALF:
            _check(4, 17, 100, 256, dtype, group=64)
            _check(4, 70, 33, 128, dtype, group=32, bias=False)
            if CUDA:  # several tiles each way
                _check(4, 300, 520, 1024, dtype, group=128)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 7, 16, 17, 40])
def test_group_sizes_and_rows(group, M, monkeypatch):
    monkeypatch.setattr(Q, "_wq_small", _Unused())
    monkeypatch.setattr(Q, "_wq_large", _Unused())
    _check(4, M, 70, 4 * group, torch.float16, group=group)


def test_same_bits_every_call_and_counters_left_at_zero(monkeypatch):
    """The split-K partials are added by the last program of each tile in split order, so
    two calls agree bit for bit, and each tile's counter is back to 0 for the next call."""
    counting = _Counting(W4._w4_split)
    monkeypatch.setattr(W4, "_w4_split", counting)
    g = torch.Generator().manual_seed(3)
    q, s, z = (t.to(DEVICE) for t in qp.quantize_int4(torch.randn(200, 1024, generator=g), 128))
    x = torch.randn(3, 1024, generator=g).to(DEVICE, torch.float16)
    first = Q.int4_matmul(x, q, s, z, 128)
    assert torch.equal(first, Q.int4_matmul(x, q, s, z, 128))
    assert counting.calls == 2  # one launch per call: no separate sum or cast
    assert all(int(c.abs().sum()) == 0 for c in W4._COUNTERS.values())


def test_falls_back_where_it_cannot_serve(monkeypatch):
    """fp32 activations, or a packed weight whose rows are not 4-byte aligned, take the
    general kernels, with results within the rule."""
    monkeypatch.setattr(W4, "_w4_split", _Unused())
    monkeypatch.setattr(W4, "_w4_tiled", _Unused())
    _check(4, 5, 40, 256, torch.float32)
    _check(4, 17, 40, 256, torch.float32)
    q, s, z = (t.to(DEVICE) for t in qp.quantize_int4(torch.randn(40, 256), 64))
    shifted = torch.empty(q.numel() + 1, dtype=torch.uint8, device=DEVICE)[1:].view(q.shape)
    shifted.copy_(q)
    for M in (2, 20):  # split-K and tiled sizes
        x = torch.randn(M, 256).to(DEVICE, torch.float16)
        assert not W4.supports(x, shifted) and W4.supports(x, q)
        exact, model, magnitude = _references(x, [q, s, z], None, 64)
        got = Q.int4_matmul(x, shifted, s, z, 64)
        assert_within_rule({"y": got}, {"y": exact}, {"y": model}, {"y": magnitude})
    with pytest.raises(ValueError, match="fp16/bf16 rows"):
        W4.w4a16_matmul(x.float(), q, s, z, 64)
