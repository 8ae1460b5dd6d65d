"""fused_mlp against its exact (fp64) reference under the error rule of precision.py (see
test_attention), broken variants the rule must reject, the module drop-in, and models trained
with either MLP implementation."""
import pytest
import torch

from kcap.kernels import GatedMLP, fused_mlp, mlp_reference
from kcap.kernels import gated_mlp as G
from kcap.kernels.runtime import INTERPRET, pinned

from . import rounded_references as R
from .precision import EXACT, assert_within_rule, at, margins, round_to_tf32, ulp

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
# (tokens M, in K, hidden N, out D): none a multiple of the 64x64x32 interpreter tiles but one.
SHAPES = [(37, 48, 100, 40), (1, 64, 33, 64), (130, 96, 200, 72), (64, 64, 64, 64)]
KINDS = [("gated", False), ("gated", True), ("gelu", True), ("silu", False)]


def _params(shape, kind, bias, dtype, seed=0):
    M, K, N, D = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = {"w_up": torch.randn(N, K, generator=g) / K ** 0.5,
         "w_down": torch.randn(D, N, generator=g) / N ** 0.5}
    if kind == "gated":
        w["w_gate"] = torch.randn(N, K, generator=g) / K ** 0.5
    if bias:
        w["b_up"], w["b_down"] = torch.randn(N, generator=g) * 0.1, torch.randn(D, generator=g) * 0.1
        if kind == "gated":
            w["b_gate"] = torch.randn(N, generator=g) * 0.1
    act = "gelu" if kind == "gelu" else "silu"
    return x.to(DEVICE, dtype), {k: v.to(DEVICE, dtype) for k, v in w.items()}, act


def _output_grad(shape, dtype):
    return torch.randn(shape[0], shape[3], generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)


def _grads(fn, x, w, act, dy):
    """{y, x, <parameter name>...}: the output and the gradients of sum(y * dy)."""
    x = x.detach().requires_grad_()
    w = {k: v.detach().requires_grad_() for k, v in w.items()}
    y = fn(x, **w, act=act)
    names = ["x"] + sorted(w)
    grads = torch.autograd.grad(y, [x] + [w[k] for k in sorted(w)], dy.to(y.dtype))
    return {"y": y.detach(), **dict(zip(names, grads))}


def _references(x, w, act, dy, round_dh=False):
    """(exact, model, magnitudes) of the error rule for these inputs (``round_dh``: the
    model of split_mlp, which stores dh; see rounded_references.mlp)."""
    exact, magnitudes = R.mlp(x, w, act, dy, EXACT, magnitudes=True)
    return exact, R.mlp(x, w, act, dy, at(x.dtype), round_dh=round_dh), magnitudes


def _check(shape, kind, bias, dtype, kernel=fused_mlp, round_dh=False):
    """``kernel`` (fused_mlp or split_mlp) within the rule on these inputs."""
    x, w, act = _params(shape, kind, bias, dtype)
    dy = _output_grad(shape, dtype)
    got = _grads(kernel, x, w, act, dy)
    for name, t in got.items():
        assert t.dtype == dtype, name
    assert_within_rule(got, *_references(x, w, act, dy, round_dh))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind, bias", KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_matches_reference(shape, kind, bias, dtype):
    _check(shape, kind, bias, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind, bias", KINDS, ids=lambda v: str(v))
def test_exact_reference_is_the_mlp_and_its_gradient(shape, kind, bias):
    """The explicit fp64 formulas the rule measures against equal autograd of mlp_reference
    in fp64 (an independent check of the formulas the kernels are held to)."""
    x, w, act = _params(shape, kind, bias, torch.float64)
    dy = _output_grad(shape, torch.float64)
    exact = R.mlp(x, w, act, dy, EXACT)
    for name, want in _grads(mlp_reference, x, w, act, dy).items():
        torch.testing.assert_close(exact[name], want, rtol=1e-12, atol=1e-12, msg=name)


def _row_off(got):
    y = got["y"].clone()
    y[0] *= 1 + 1e-4
    return {**got, "y": y}


# Each must fail the rule (measured in fp32: by >= 20x in its worst-hit output).
BROKEN = {
    "tf32 inputs": lambda x, w, act, dy: _grads(fused_mlp, round_to_tf32(x),
                                                {k: round_to_tf32(v) for k, v in w.items()}, act, dy),
    "b_down dropped": lambda x, w, act, dy: _grads(
        fused_mlp, x, {**w, "b_down": torch.zeros_like(w["b_down"])}, act, dy),
    "one row off by 1e-4": lambda x, w, act, dy: _row_off(_grads(fused_mlp, x, w, act, dy)),
}


@pytest.mark.parametrize("kind", ["gated", "gelu"])
@pytest.mark.parametrize("bug", BROKEN)
def test_rule_rejects_broken_kernel(bug, kind):
    x, w, act = _params((37, 48, 100, 40), kind, True, torch.float32)
    dy = _output_grad((37, 48, 100, 40), torch.float32)
    found = margins(BROKEN[bug](x, w, act, dy), *_references(x, w, act, dy))
    assert max(found.values()) > 1, found


@pytest.mark.skipif(not CUDA, reason="bf16 is only right on a GPU")
@pytest.mark.parametrize("shape", SHAPES + [(4096, 768, 2048, 768)], ids=str)
@pytest.mark.parametrize("kind, bias", KINDS, ids=lambda v: str(v))
def test_matches_reference_bf16_gpu(shape, kind, bias):
    _check(shape, kind, bias, torch.bfloat16)


def test_leading_dims_and_module_drop_in():
    from kcap.models import model_config
    from kcap.models.transformer import MLP

    torch.manual_seed(0)
    ref = MLP(model_config("llama-1-1", 100)).to(DEVICE)
    fused = GatedMLP(64, ref.up.out_features).to(DEVICE)
    fused.load_state_dict(ref.state_dict())  # same keys, same shapes
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 7, 64, device=DEVICE)
    torch.testing.assert_close(fused(x), ref.down(torch.nn.functional.silu(ref.gate(x)) * ref.up(x)),
                               rtol=1e-5, atol=1e-5)


def test_bad_input():
    x, w, act = _params((5, 16, 32, 16), "gated", False, torch.float32)
    with pytest.raises(ValueError, match="act must be"):
        fused_mlp(x, **w, act="relu")
    with pytest.raises(ValueError, match="w_up must be"):
        fused_mlp(x[:, :8], **w)
    with pytest.raises(ValueError, match="w_down must be"):
        fused_mlp(x, w["w_up"], w["w_down"][:, :5], w["w_gate"])
    with pytest.raises(TypeError, match="one dtype"):
        fused_mlp(x.half(), **w)
    with pytest.raises(ValueError, match="all biases or none"):
        fused_mlp(x, w["w_up"], w["w_down"], b_up=torch.zeros(32, device=DEVICE))
    with pytest.raises(ValueError, match="gated MLP uses silu"):
        fused_mlp(x, **w, act="gelu")


def test_torch_compile_fullgraph():
    x, w, act = _params((9, 32, 40, 32), "gated", True, torch.float32)
    x.requires_grad_()
    f = torch.compile(lambda x: fused_mlp(x, **w, act=act).sum(), fullgraph=True, backend="aot_eager")
    out = f(x)
    out.backward()
    torch.testing.assert_close(out, mlp_reference(x, **w, act=act).sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("model", ["gpt2-1-2", "llama-1-2", "llamaplain-1-2", "mistral-1-4", "gpt2moe-1-2"])
def test_models_train_alike_with_either_mlp(tmp_path, model):
    from kcap.train import DataConfig, TrainConfig, read_log, train

    losses = {}
    for impl in ("torch", "triton"):
        cfg = TrainConfig(model=model, model_options={"mlp_impl": impl, "attn_impl": "torch"},
                          data=DataConfig(n=40), exposures=2, window=128, batch_size=2, steps=4,
                          log_every=1, checkpoint_every=0, eval_sample=8, device=DEVICE)
        train(cfg, tmp_path / impl, progress=False)
        losses[impl] = [r["loss"] for r in read_log(tmp_path / impl) if "loss" in r]
    assert losses["torch"] == pytest.approx(losses["triton"], rel=1e-4)


@pytest.mark.parametrize("name", ["llama-1-1", "gpt2moe-1-1"])
def test_kernel_paths_follow_autocast(name):
    from kcap.models import build_model

    torch.manual_seed(0)
    options = {"n_experts": 4} if "moe" in name else {}
    fast = build_model(name, 100, mlp_impl="triton", attn_impl="triton", **options).to(DEVICE)
    ref = build_model(name, 100, mlp_impl="torch", attn_impl="torch", **options).to(DEVICE)
    ref.load_state_dict(fast.state_dict())
    x = torch.randint(0, 100, (2, 40), device=DEVICE)
    low = torch.bfloat16 if CUDA else torch.float16
    with torch.autocast(DEVICE, dtype=low):
        a, b = fast(x)[0], ref(x)[0]
    assert a.dtype == b.dtype == low  # the custom ops ran in the autocast dtype, like the torch path
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=8 * ulp(low) * b.abs().max().item())


@pytest.mark.parametrize("candidate", [*G.GEMM_CANDIDATES, *G.GEMM_TRIALS],
                         ids=[f"{i}" for i in range(len(G.GEMM_CANDIDATES))]
                         + [f"trial-{i}" for i in range(len(G.GEMM_TRIALS))])
def test_every_autotune_candidate(candidate):
    """Each GEMM candidate alone, trials (KCAP_TRIAL_CANDIDATES) included: autotuning would
    only expose a wrong one where it wins."""
    # on CPU too, a shape past 128 in every dimension: the 128-row / 128-column tiles of the
    # larger candidates and trials each meet a full tile and a tail
    shapes = [(130, 96, 200, 72), (300, 256, 520, 200)] if CUDA else [(37, 48, 100, 40),
                                                                       (150, 72, 140, 136)]
    with pinned((G._epilogue_gemm, candidate)):
        for shape in shapes:
            for kind, bias in (("gated", True), ("gelu", True)):
                for dtype in ([torch.float16, torch.bfloat16] if CUDA else [torch.float16]):
                    _check(shape, kind, bias, dtype)
