"""grouped_linear against its plain loop, forward and gradients, under the tolerance rule."""
import pytest
import torch

from kcap.kernels import grouped_gemm as G
from kcap.kernels import grouped_linear, grouped_linear_reference
from kcap.kernels.runtime import INTERPRET, pinned

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -23}


def _case(E, K, N, blocks, block, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(blocks * block, K, generator=g)
    w = torch.randn(E, K, N, generator=g) / K ** 0.5
    b = torch.randn(E, N, generator=g) * 0.1 if bias else None
    be = torch.sort(torch.randint(0, E, (blocks,), generator=g)).values  # runs of one expert
    dy = torch.randn(blocks * block, N, generator=g)
    return (t.to(DEVICE) if t is not None else None for t in (x, w, b, be, dy))


def _grads(fn, x, w, b, be, block, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, w, b, be, block)
    params = [x, w] + ([b] if b is not None else [])
    return [y.detach()] + list(torch.autograd.grad(y, params, dy.to(y.dtype)))


@pytest.mark.parametrize("E, K, N, blocks", [(4, 64, 96, 5), (3, 40, 33, 3), (8, 32, 64, 8), (1, 64, 64, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_matches_reference(E, K, N, blocks, bias, dtype):
    block = 16
    x, w, b, be, dy = _case(E, K, N, blocks, block, dtype, bias)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    cast = lambda t, d: t.to(d) if t is not None else None  # noqa: E731
    ref = _grads(grouped_linear_reference, cast(x, ref_dtype), cast(w, ref_dtype), cast(b, ref_dtype), be, block, dy.to(ref_dtype))
    low = _grads(grouped_linear_reference, cast(x, dtype), cast(w, dtype), cast(b, dtype), be, block, dy)
    kern = _grads(grouped_linear, cast(x, dtype), cast(w, dtype), cast(b, dtype), be, block, dy)
    for r, t, k in zip(ref, low, kern):
        torch_err = (t.to(ref_dtype) - r).abs().max().item()
        kernel_err = (k.to(ref_dtype) - r).abs().max().item()
        assert kernel_err <= 2 * torch_err + ULP[dtype] * max(1.0, r.abs().max().item())


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
    ref = _grads(grouped_linear_reference, x, w, b, be, 16, dy)
    assert (kern[0][32:] == 0).all()
    for a, r in zip(kern, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


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
