"""linear_cross_entropy against its exact (fp64) reference under the error rule of
precision.py (see test_attention): broken results the rule must reject, ignored and
out-of-range targets, the no-grad path, agreement with PyTorch, and bad inputs."""
import math

import pytest
import torch

from kcap.kernels import cross_entropy as L
from kcap.kernels.cross_entropy import (linear_cross_entropy, linear_cross_entropy_reference,
                                        stacked_linear_cross_entropy)
from kcap.kernels.runtime import INTERPRET

from . import rounded_references as R
from .model_paths import VOCAB, assert_same_in_fp32, loss_and_grads
from .precision import EXACT, assert_within_rule, at, margins

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# (tokens N, width D, vocabulary V, rows per chunk): none a multiple of the blocks
SHAPES = [(37, 24, 129, 8), (1, 16, 50, 1), (65, 40, 300, 16)]


def inputs(shape, dtype, bias, seed=0, ignored=(3, 10)):
    n, d, v, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.1).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[[i for i in ignored if i < n]] = -100
    return x, w, b, t


def run_kernel(x, w, b, t, chunk) -> dict:
    x, w = x.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_()
    b = None if b is None else b.to(DEVICE).requires_grad_()
    loss = linear_cross_entropy(x, w, t.to(DEVICE), b, chunk=chunk)
    loss.backward()
    out = {"loss": loss.detach().cpu(), "x": x.grad.cpu(), "w": w.grad.cpu()}
    if b is not None:
        out["b"] = b.grad.cpu()
    return out


def references(x, w, b, t, chunk, dtype):
    exact, magnitude = R.linear_cross_entropy(x, w, b, t, chunk, EXACT, magnitudes=True)
    return exact, R.linear_cross_entropy(x, w, b, t, chunk, at(dtype)), magnitude


@pytest.mark.parametrize("block", [64, None], ids=["block64", "one_block"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_exact_reference_within_the_rule(shape, dtype, bias, block, monkeypatch):
    if block is not None:  # several passes over the vocabulary per row
        monkeypatch.setattr(L, "_block_v", lambda v: block)
    x, w, b, t = inputs(shape, dtype, bias)
    assert_within_rule(run_kernel(x, w, b, t, shape[3]), *references(x, w, b, t, shape[3], dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rule_rejects_broken_results(dtype):
    shape = SHAPES[2]
    x, w, b, t = inputs(shape, dtype, True)
    refs = references(x, w, b, t, shape[3], dtype)
    got = run_kernel(x, w, b, t, shape[3])
    shifted = t.clone()
    shifted[t >= 0] = (t[t >= 0] + 1) % shape[2]
    broken = {"targets off by one": run_kernel(x, w, b, shifted, shape[3]),
              "loss off by 1e-3": {**got, "loss": got["loss"] * (1 + 1e-3)},
              "dx off by 1e-2": {**got, "x": got["x"] * 1.01},
              "one row of dW off by 1e-2": {**got, "w": torch.cat([got["w"][:1] * 1.01, got["w"][1:]])},
              "db dropped": {**got, "b": torch.zeros_like(got["b"])}}
    for name, result in broken.items():
        found = margins(result, *refs)
        assert max(found.values()) > 1, f"{name} passed the rule: {found}"


def test_agrees_with_pytorch_and_the_no_grad_path():
    x, w, b, t = inputs(SHAPES[0], torch.float32, True)
    ref = linear_cross_entropy_reference(x, w, t, b)
    args = (x.to(DEVICE), w.to(DEVICE), t.to(DEVICE), b.to(DEVICE))
    got = linear_cross_entropy(*args, chunk=5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    with torch.no_grad():
        assert linear_cross_entropy(*args, chunk=5).item() == got.item()


def test_ignored_and_out_of_range_targets():
    x, w, _, t = inputs(SHAPES[0], torch.float32, False, ignored=range(37))
    x, w = x.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_()
    loss = linear_cross_entropy(x, w, t.to(DEVICE))  # every target ignored: 0, not NaN
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.abs().sum() and not w.grad.abs().sum()
    x, w, _, t = inputs(SHAPES[0], torch.float32, False)
    t[5] = 129  # = V: out of range
    with torch.no_grad():
        assert math.isnan(linear_cross_entropy(x.to(DEVICE), w.to(DEVICE), t.to(DEVICE)).item())


def test_bad_inputs_are_refused():
    x, w, b, t = (v.to(DEVICE) for v in inputs(SHAPES[0], torch.float32, True))
    cases = [((x[:, :5], w, t), ValueError, "same D"),
             ((x, w, t[:-1]), ValueError, "targets must be"),
             ((x, w, t.int()), ValueError, "targets must be"),
             ((x, w.half(), t), ValueError, "share one dtype"),
             ((x, w, t, b[:-1]), ValueError, "bias must be"),
             ((x, w, t, None, -100, 0), ValueError, "chunk must be"),
             ((x.tolist(), w, t), TypeError, "must be tensors")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            linear_cross_entropy(*args)


def test_torch_compile_fullgraph():
    x, w, b, t = (v.to(DEVICE) for v in inputs(SHAPES[0], torch.float32, True))
    x.requires_grad_()
    f = torch.compile(lambda x: linear_cross_entropy(x, w, t, b, chunk=8), fullgraph=True,
                      backend="aot_eager")
    loss = f(x)
    loss.backward()
    eager = x.detach().clone().requires_grad_()
    expected = linear_cross_entropy(eager, w, t, b, chunk=8)
    expected.backward()
    assert loss.item() == expected.item() and torch.equal(x.grad, eager.grad)


def run_stacked(models, chunk, scales) -> list[dict]:
    """Every model's loss and gradients from one stacked call, backward on sum(scale_i *
    loss_i); gradients divided back by the scales (powers of two: exact)."""
    x, w, t = (torch.stack([m[k] for m in models]).to(DEVICE) for k in (0, 1, 3))
    x.requires_grad_(), w.requires_grad_()
    b = None if models[0][2] is None else torch.stack([m[2] for m in models]).to(DEVICE).requires_grad_()
    losses = stacked_linear_cross_entropy(x, w, t, b, chunk=chunk)
    assert losses.shape == (len(models),) and losses.dtype == torch.float32
    (losses * torch.tensor(scales, device=DEVICE)).sum().backward()
    out = []
    for i, scale in enumerate(scales):
        got = {"loss": losses[i].detach().cpu(), "x": x.grad[i].cpu() / scale,
               "w": w.grad[i].cpu() / scale}
        if b is not None:
            got["b"] = b.grad[i].cpu() / scale
        out.append(got)
    return out


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stacked_models_each_match_their_own_reference(dtype, bias):
    """Three models in one call (a pack): each within the rule of its own exact reference,
    its gradients scaled by its own loss's gradient; a model whose targets are all ignored
    gets 0 and zero gradients."""
    shape = SHAPES[2]
    models = [inputs(shape, dtype, bias, seed=i, ignored=ignored)
              for i, ignored in enumerate([(3, 10), range(shape[0]), ()])]
    got = run_stacked(models, shape[3], [1.0, 0.5, 2.0])
    for i, (x, w, b, t) in enumerate(models):
        if i == 1:
            assert got[i]["loss"].item() == 0.0
            assert all(not g.abs().sum() for k, g in got[i].items() if k != "loss")
            continue
        assert_within_rule(got[i], *references(x, w, b, t, shape[3], dtype))


def test_stacked_launches_once_per_chunk_for_all_models(monkeypatch):
    """The row kernel runs once per chunk whatever M (M solo calls would launch M times)."""
    launches = []

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]
    real = L._ce_rows
    monkeypatch.setattr(L, "_ce_rows", Counting())
    models = [inputs(SHAPES[2], torch.float32, False, seed=i) for i in range(4)]
    run_stacked(models, 16, [1.0] * 4)
    assert launches == [(4 * 16,)] * 4 + [(4 * 1,)]  # 65 rows per model: chunks of 16, then 1


def test_stacked_bad_inputs_are_refused():
    x, w, b, t = (v.to(DEVICE) for v in inputs(SHAPES[0], torch.float32, True))
    X, W, B, T = x[None].expand(2, -1, -1), w[None].expand(2, -1, -1), b[None].expand(2, -1), t[None].expand(2, -1)
    cases = [((x, w, t), ValueError, r"x must be \(M, N, D\)"),
             ((X, W[:1], T), ValueError, "same M x D"),
             ((X, W, T[:1]), ValueError, "targets must be"),
             ((X, W, T, B[:, :-1]), ValueError, "bias must be"),
             ((X, W, T, None, -100, True), ValueError, "chunk must be")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            stacked_linear_cross_entropy(*args)


@pytest.mark.parametrize("name", ["gpt2-1-2", "llama-1-2"])
def test_models_get_the_same_loss_and_gradients_from_the_fused_head(name):
    ids = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(1))
    targets = ids[:, 1:].clone()
    targets[0, :4] = -100
    runs = {impl: loss_and_grads(name, ids[:, :-1], targets, DEVICE, loss_impl=impl)
            for impl in ("torch", "triton")}
    assert runs["triton"][0] is None and runs["torch"][0] is not None  # fused: no logits
    assert_same_in_fp32(runs["triton"][1:], runs["torch"][1:])


@pytest.mark.parametrize("n, d, chunks", [(12_288, 64, 2), (49_152, 256, 7), (200_000, 64, 26),
                                          (200_000, 1280, 4), (7, 64, 1)])
def test_default_chunks_are_few_and_far_smaller_than_eager(n, d, chunks):
    """At the paper's shapes (bf16, kcap's vocabulary): few chunks (each costs ~8 launches),
    each holding at most the larger of 64 MiB and x's size in logits, against eager's
    10+ bytes per logit for the whole batch."""
    from kcap.data.tokenizer import default_tokenizer

    v, itemsize = default_tokenizer().vocab_size, 2  # 4,337: the models' LM head rows
    rows = L._default_chunk(n, d, v, itemsize)
    assert 1 <= rows <= n and math.ceil(n / rows) == chunks
    assert rows * v * itemsize <= max(L.MIN_CHUNK_BYTES, n * d * itemsize) + v * itemsize
    assert rows == n or rows * v * itemsize >= L.MIN_CHUNK_BYTES
