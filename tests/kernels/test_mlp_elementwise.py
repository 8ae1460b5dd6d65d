"""split_mlp (cuBLAS GEMMs around one elementwise Triton kernel) against its exact (fp64)
reference under the error rule of precision.py, with dh rounded where split_mlp stores it;
broken variants the rule must reject; agreement with fused_mlp; no graph break."""
import pytest
import torch

from kcap.kernels import fused_mlp, split_mlp
from kcap.kernels.runtime import INTERPRET

from . import test_gated_mlp as gated
from .model_paths import VOCAB, assert_same_in_fp32, loss_and_grads
from .precision import margins
from .test_gated_mlp import KINDS, SHAPES, _grads, _output_grad, _params

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")


def _references(x, w, act, dy):
    return gated._references(x, w, act, dy, round_dh=True)


def _check(shape, kind, bias, dtype):
    gated._check(shape, kind, bias, dtype, kernel=split_mlp, round_dh=True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind, bias", KINDS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_matches_reference(shape, kind, bias, dtype):
    _check(shape, kind, bias, dtype)


@pytest.mark.skipif(not CUDA, reason="bf16 is only right on a GPU")
@pytest.mark.parametrize("shape", SHAPES + [(4096, 768, 2048, 768)], ids=str)
@pytest.mark.parametrize("kind, bias", KINDS, ids=lambda v: str(v))
def test_matches_reference_bf16_gpu(shape, kind, bias):
    _check(shape, kind, bias, torch.bfloat16)


def _silu_for_gelu(x, w, act, dy):
    return _grads(split_mlp, x, w, "silu", dy)


def _gate_ignored(x, w, act, dy):
    ones = {**w, "w_gate": torch.zeros_like(w["w_gate"]), "b_gate": torch.zeros_like(w["b_gate"])}
    return _grads(split_mlp, x, ones, act, dy)


@pytest.mark.parametrize("kind, bug", [("gelu", _silu_for_gelu), ("gated", _gate_ignored)],
                         ids=["silu_for_gelu", "gate_zeroed"])
def test_rule_rejects_broken_kernel(kind, bug):
    x, w, act = _params((37, 48, 100, 40), kind, True, torch.float32)
    dy = _output_grad((37, 48, 100, 40), torch.float32)
    found = margins(bug(x, w, act, dy), *_references(x, w, act, dy))
    assert max(found.values()) > 1, found


@pytest.mark.parametrize("kind, bias", KINDS, ids=lambda v: str(v))
def test_agrees_with_the_epilogue_kernel(kind, bias):
    """Both designs compute one MLP: in fp32 they differ only by summation order."""
    x, w, act = _params((37, 48, 100, 40), kind, bias, torch.float32)
    dy = _output_grad((37, 48, 100, 40), torch.float32)
    split, fused = _grads(split_mlp, x, w, act, dy), _grads(fused_mlp, x, w, act, dy)
    for name in fused:
        torch.testing.assert_close(split[name], fused[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind, bias", KINDS, ids=lambda v: str(v))
def test_vmap_over_models_is_batched_gemms_and_one_elementwise_launch(kind, bias, monkeypatch):
    """vmap over M models' weights (a pack, kcap.pack): torch.bmm for the GEMMs and one
    elementwise launch over all models' rows, forward and backward. Outputs and gradients
    are the per-model calls' up to the GEMMs' summation order (bmm vs mm), in fp32."""
    from torch.func import vmap

    from kcap.kernels import mlp_elementwise

    shape, m = (37, 48, 100, 40), 3
    models = [_params(shape, kind, bias, torch.float32, seed=s) for s in range(m)]
    x = torch.stack([xm for xm, _, _ in models]).detach().requires_grad_()
    act = models[0][2]
    w = {k: torch.stack([wm[k] for _, wm, _ in models]).detach().requires_grad_() for k in models[0][1]}
    dy = torch.stack([_output_grad(shape, torch.float32) * (i + 1) for i in range(m)])
    launches = []
    real = mlp_elementwise._run
    monkeypatch.setattr(mlp_elementwise, "_run",
                        lambda g, *rest: launches.append(tuple(g.shape)) or real(g, *rest))
    y = vmap(lambda xm, wm: split_mlp(xm, **wm, act=act))(x, w)
    grads = torch.autograd.grad(y, [x] + [w[k] for k in sorted(w)], dy)
    assert launches == [(m * shape[0], shape[2])] * 2  # forward, backward: all models at once
    for i, (xm, wm, _) in enumerate(models):
        want = _grads(split_mlp, xm, wm, act, dy[i])
        got = {"y": y[i], "x": grads[0][i], **{k: g[i] for k, g in zip(sorted(w), grads[1:])}}
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_torch_compile_fullgraph_and_leading_dims():
    x, w, act = _params((9, 32, 40, 32), "gated", True, torch.float32)
    x = x.reshape(3, 3, 32).requires_grad_()
    f = torch.compile(lambda x: split_mlp(x, **w, act=act).sum(), fullgraph=True, backend="aot_eager")
    out = f(x)
    out.backward()
    torch.testing.assert_close(out, split_mlp(x.detach(), **w, act=act).sum())


@pytest.mark.parametrize("name", ["gpt2-1-2", "llama-1-2"])
def test_models_compute_the_same_with_the_split_mlp(name):
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    device = "cuda" if CUDA else "cpu"
    runs = {impl: loss_and_grads(name, ids[:, :-1], ids[:, 1:], device, mlp_impl=impl)
            for impl in ("torch", "split")}
    assert_same_in_fp32(runs["split"][1:], runs["torch"][1:])
