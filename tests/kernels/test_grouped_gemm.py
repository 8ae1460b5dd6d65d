"""grouped_linear against its exact (fp64) reference, forward and gradients, under the error
rule of precision.py (see test_attention), and broken variants the rule must reject."""
import pytest
import torch

from kcap.kernels import grouped_gemm as G
from kcap.kernels import grouped_linear, grouped_linear_reference
from kcap.kernels.runtime import INTERPRET, pinned

from . import rounded_references as R
from .precision import EXACT, assert_within_rule, at, margins, round_to_tf32

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
OUTPUTS = ("y", "x", "weight", "bias")  # the output, then the gradients


def _case(E, K, N, blocks, block, dtype, bias, seed=0):
    """x, weight, bias (or None), block_expert, dy in dtype (block_expert int64) on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(blocks * block, K, generator=g)
    w = torch.randn(E, K, N, generator=g) / K ** 0.5
    b = torch.randn(E, N, generator=g) * 0.1 if bias else None
    be = torch.sort(torch.randint(0, E, (blocks,), generator=g)).values  # runs of one expert
    dy = torch.randn(blocks * block, N, generator=g)
    return [t.to(DEVICE, dtype if t.is_floating_point() else None) if t is not None else None
            for t in (x, w, b, be, dy)]


def _grads(fn, x, w, b, be, block, dy):
    """[y, dx, dweight(, dbias)] for the loss sum(y * dy)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, w, b, be, block)
    params = [x, w] + ([b] if b is not None else [])
    return [y.detach()] + list(torch.autograd.grad(y, params, dy.to(y.dtype)))


def _named(tensors):
    return dict(zip(OUTPUTS, tensors))


def _references(x, w, b, be, block, dy):
    """(exact, model, magnitudes) of the error rule, each {name: tensor}."""
    exact, magnitudes = R.grouped_linear(x, w, b, be, block, dy, EXACT, magnitudes=True)
    model = R.grouped_linear(x, w, b, be, block, dy, at(x.dtype))
    return _named(exact), _named(model), _named(magnitudes)


SHAPES = [(4, 64, 96, 5), (3, 40, 33, 3), (8, 32, 64, 8), (1, 64, 64, 1)]  # (E, K, N, blocks)


@pytest.mark.parametrize("E, K, N, blocks", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_matches_reference(E, K, N, blocks, bias, dtype):
    x, w, b, be, dy = _case(E, K, N, blocks, 16, dtype, bias)
    got = _named(_grads(grouped_linear, x, w, b, be, 16, dy))
    for name, t in got.items():
        assert t.dtype == dtype, name
    assert_within_rule(got, *_references(x, w, b, be, 16, dy))


@pytest.mark.parametrize("E, K, N, blocks", SHAPES)
def test_exact_reference_is_the_loop_and_its_gradient(E, K, N, blocks):
    """The explicit fp64 formulas the rule measures against equal autograd of the plain loop."""
    x, w, b, be, dy = (t.double() if t.is_floating_point() else t
                       for t in _case(E, K, N, blocks, 16, torch.float32, True))
    expected = _grads(grouped_linear_reference, x, w, b, be, 16, dy)
    for name, got, want in zip(OUTPUTS, R.grouped_linear(x, w, b, be, 16, dy, EXACT), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def _row_off(grads):
    y = grads[0].clone()
    y[0] *= 1 + 1e-4
    return [y] + grads[1:]


# Each must fail the rule (measured in fp32: by >= 75x in its worst-hit output).
BROKEN = {
    "tf32 inputs": lambda x, w, b, be, dy: _grads(grouped_linear, round_to_tf32(x), round_to_tf32(w),
                                                  b, be, 16, dy),
    "bias dropped": lambda x, w, b, be, dy: _grads(grouped_linear, x, w, torch.zeros_like(b), be, 16, dy),
    "one row off by 1e-4": lambda x, w, b, be, dy: _row_off(_grads(grouped_linear, x, w, b, be, 16, dy)),
}


@pytest.mark.parametrize("bug", BROKEN)
def test_rule_rejects_broken_kernel(bug):
    x, w, b, be, dy = _case(4, 64, 96, 5, 16, torch.float32, True)
    found = margins(_named(BROKEN[bug](x, w, b, be, dy)), *_references(x, w, b, be, 16, dy))
    assert max(found.values()) > 1, found


def test_experts_without_rows_get_zero_weight_gradient():
    x, w, b, be, dy = _case(4, 32, 32, 2, 16, torch.float32, True)
    be = torch.tensor([1, 1], device=DEVICE)
    grads = _grads(grouped_linear, x, w, b, be, 16, dy)
    assert (grads[2][[0, 2, 3]] == 0).all() and (grads[3][[0, 2, 3]] == 0).all()
    assert grads[2][1].abs().sum() > 0


def test_bad_input():
    x, w, b, be, _ = _case(2, 32, 32, 2, 16, torch.float32, True)
    with pytest.raises(ValueError, match="rows"):
        grouped_linear(x[:20], w, b, be, 16)
    with pytest.raises(ValueError, match="power of two"):
        grouped_linear(x, w, b, be, 12)
    with pytest.raises(TypeError, match="int64"):
        grouped_linear(x, w, b, be.int(), 16)
    with pytest.raises(ValueError, match="bias must be"):
        grouped_linear(x, w, b[:1], be, 16)


def test_tiny_gpt2_moe_trains_alike_on_the_fast_path(tmp_path):
    from kcap.train import DataConfig, TrainConfig, read_log, train

    losses = {}
    for name, options in (("reference", {"router_impl": "torch", "mlp_impl": "torch"}),
                          ("fast", {"router_impl": "auto", "mlp_impl": "triton"})):
        cfg = TrainConfig(model="gpt2moe-1-2", model_options={**options, "attn_impl": "torch"},
                          data=DataConfig(n=40), exposures=2, window=128, batch_size=2, steps=4,
                          log_every=1, checkpoint_every=0, eval_sample=8, device=DEVICE)
        train(cfg, tmp_path / name, progress=False)
        losses[name] = [r["loss"] for r in read_log(tmp_path / name) if "loss" in r]
    assert losses["reference"] == pytest.approx(losses["fast"], rel=1e-4)


def test_unused_trailing_blocks_give_zero_rows_and_no_gradient():
    # The CUDA router's maximum-size layout ends in blocks marked -1.
    x, w, b, _, dy = _case(3, 32, 48, 4, 16, torch.float32, True)
    be = torch.tensor([0, 2, -1, -1], device=DEVICE)
    dy[32:] = 0  # what the MoE sends back for unused rows
    kern = _grads(grouped_linear, x, w, b, be, 16, dy)
    assert (kern[0][32:] == 0).all() and (kern[1][32:] == 0).all()
    assert_within_rule(_named(kern), *_references(x, w, b, be, 16, dy))


@pytest.mark.parametrize("which, index", [("mm", i) for i in range(len(G.MM_CANDIDATES))] +
                         [("wgrad", i) for i in range(len(G.WGRAD_CANDIDATES))])
def test_every_autotune_candidate(which, index):
    """Each candidate of the forward/dX GEMM and of the weight-gradient GEMM alone."""
    pins = ((G._grouped_mm, G.MM_CANDIDATES[index]) if which == "mm" else
            (G._grouped_wgrad, G.WGRAD_CANDIDATES[index]))
    with pinned(pins):
        for dtype in ([torch.float16, torch.bfloat16] if CUDA else [torch.float16]):
            test_matches_reference(4, 64, 96, 5, True, dtype)
            test_matches_reference(3, 40, 33, 3, False, dtype)
