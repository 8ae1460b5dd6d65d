"""flash_attention against its exact (fp64) reference under the error rule of precision.py:
each output's error is at most twice that of a model whose every rounding is specified, plus
one ulp at the output's scale and one fp32 ulp at the scale of its terms. Broken variants of
the kernel must fail the same rule."""
import math

import pytest
import torch

from kcap.kernels import flash_attention
from kcap.kernels.runtime import INTERPRET, pinned

from . import rounded_references as R
from .precision import EXACT, assert_within_rule, at, margins, round_to_tf32

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs a GPU or TRITON_INTERPRET=1")

# (batch, heads, kv_heads, T, S, head_dim, causal): T = 1, tails that are no multiple of any
# block size, T != S (non-causal), GQA ratios 1, 2, 4 and 8, every head dim.
CASES = [
    (1, 2, 2, 1, 1, 64, True),
    (2, 4, 2, 37, 37, 32, True),
    (1, 4, 1, 130, 130, 64, True),
    (1, 8, 1, 65, 65, 128, True),
    (1, 2, 2, 70, 70, 128, True),
    (1, 2, 2, 33, 50, 64, False),
    (1, 4, 4, 50, 33, 32, False),
    (2, 8, 2, 17, 90, 128, False),
    (1, 8, 1, 64, 64, 32, False),
]


def _inputs(case, dtype, seed=0):
    """q, k, v and the output gradient dO, in dtype on DEVICE."""
    B, H, KV, T, S, D, _ = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((B, H, T, D), (B, KV, S, D), (B, KV, S, D)))
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def _kernel(q, k, v, do, causal, scale=None):
    """The kernel's {out, lse, dq, dk, dv} for the loss sum(out * do)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    o, lse = flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    o.backward(do)
    return {"out": o.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _references(q, k, v, do, causal, scale=None):
    """(exact, model, magnitudes) of the error rule for these inputs."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    exact, magnitudes = R.attention(q, k, v, do, causal, scale, EXACT, magnitudes=True)
    return exact, R.attention(q, k, v, do, causal, scale, at(q.dtype)), magnitudes


def _check(case, dtype, scale=None):
    q, k, v, do = _inputs(case, dtype)
    got = _kernel(q, k, v, do, case[-1], scale)
    for name, t in got.items():
        assert t.dtype == (torch.float32 if name == "lse" else dtype), name
    assert_within_rule(got, *_references(q, k, v, do, case[-1], scale))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}KV{}T{}S{}D{}{}".format(*c[:6], "causal" if c[6] else ""))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_matches_reference(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_scale_and_lse(dtype):
    _check((1, 4, 2, 40, 40, 64, True), dtype, scale=0.3)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_exact_reference_is_attention_and_its_gradient(case):
    """The explicit fp64 formulas the rule measures against equal autograd of plain fp64
    attention (an independent check of the formulas the kernels are held to)."""
    causal, scale = case[-1], 1 / math.sqrt(case[5])
    q, k, v, do = (t.double() for t in _inputs(case, torch.float32))
    exact = R.attention(q, k, v, do, causal, scale, EXACT)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=DEVICE).tril(), -math.inf)
    o = torch.softmax(s, -1) @ v.repeat_interleave(group, 1)
    o.backward(do)
    expected = {"out": o, "lse": torch.logsumexp(s, -1), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for name, want in expected.items():
        torch.testing.assert_close(exact[name], want.detach(), rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.skipif(not CUDA, reason="bf16 is only right on a GPU (the interpreter mishandles it)")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_bf16_gpu(case):
    _check(case, torch.bfloat16)


def _sees_one_key_more(q, k, v, do, causal):
    """A causal mask off by one (query i sees keys <= i + 1): the kernel behind one extra,
    leading query (whose gradient is 0)."""
    lead = lambda t: torch.cat([torch.zeros_like(t[:, :, :1]), t], 2)  # noqa: E731
    got = _kernel(lead(q), k, v, lead(do), causal)
    return {name: t[:, :, 1:] if name in ("out", "lse", "dq") else t for name, t in got.items()}


def _drops_last_key(q, k, v, do, causal):
    """A sequence-tail mask off by one: the last key is never seen (its gradients are 0)."""
    got = _kernel(q, k[:, :, :-1], v[:, :, :-1], do, causal)
    return {name: torch.cat([t, torch.zeros_like(t[:, :, :1])], 2) if name in ("dk", "dv") else t
            for name, t in got.items()}


def _output_off(q, k, v, do, causal):
    got = _kernel(q, k, v, do, causal)
    return {**got, "out": got["out"] * (1 + 1e-4)}


# Each must fail the rule (measured: by >= 70x in its worst-hit output). An output off by
# 1e-4 is below fp16's own rounding, and TF32 is an fp32 matter: those run in fp32 only.
BROKEN = {
    "tf32 inputs": lambda q, k, v, do, causal: _kernel(*map(round_to_tf32, (q, k, v)), do, causal),
    "scale off by 1e-3": lambda q, k, v, do, causal: _kernel(q, k, v, do, causal,
                                                             (1 + 1e-3) / math.sqrt(q.shape[-1])),
    "output off by 1e-4": _output_off,
    "sees one key more": _sees_one_key_more,
    "drops the last key": _drops_last_key,
}


def _broken_cases():
    for bug in BROKEN:
        for case in [(2, 4, 2, 37, 37, 32, True), (1, 2, 2, 33, 50, 64, False)]:
            if bug == "sees one key more" and not case[-1]:
                continue  # a causal mask bug
            fp32_only = bug in ("tf32 inputs", "output off by 1e-4")
            for dtype in (torch.float32,) if fp32_only else (torch.float16, torch.float32):
                name = f"{bug}-{str(dtype)[6:]}-{'causal' if case[-1] else 'full'}"
                yield pytest.param(bug, case, dtype, id=name)


@pytest.mark.parametrize("bug, case, dtype", list(_broken_cases()))
def test_rule_rejects_broken_kernel(bug, case, dtype):
    q, k, v, do = _inputs(case, dtype)
    found = margins(BROKEN[bug](q, k, v, do, case[-1]), *_references(q, k, v, do, case[-1]))
    assert max(found.values()) > 1, found


@pytest.mark.skipif(not CUDA, reason="races only show on a GPU")
@pytest.mark.parametrize("D", [32, 64, 128])
def test_backward_is_deterministic_gpu(D):
    q, k, v, do = _inputs((2, 8, 2, 1000, 1000, D, True), torch.bfloat16)
    first = _kernel(q, k, v, do, True)
    for _ in range(5):
        again = _kernel(q, k, v, do, True)
        for name in first:
            assert torch.equal(first[name], again[name]), name


def test_non_contiguous_inputs():
    q, k, v, _ = _inputs((2, 4, 4, 30, 30, 32, True), torch.float32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) storage
    assert not qt.is_contiguous()
    torch.testing.assert_close(flash_attention(qt, k, v), flash_attention(q, k, v))


@pytest.mark.parametrize("shared_kv", [False, True], ids=["per-model", "shared-kv"])
def test_vmap_folds_the_mapped_dim_into_the_batch(shared_kv):
    """vmap over a leading (model) dim runs one kernel call over M * B rows (a pack's
    attention); every row is computed as in its own call, so outputs and gradients equal
    the per-model calls bit for bit. Unmapped (shared) inputs are expanded; their gradient
    is the sum of the M models' shares, added in another order (rounding of an M-term sum)."""
    from torch.func import vmap

    M, (q, k, v, do) = 3, _inputs((6, 4, 2, 37, 37, 32, True), torch.float32)
    q, do = q.view(M, 2, 4, 37, 32), do.view(M, 2, 4, 37, 32)
    k, v = (k[:2], v[:2]) if shared_kv else (k.view(M, 2, 2, 37, 32), v.view(M, 2, 2, 37, 32))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = vmap(flash_attention, in_dims=(0, None, None) if shared_kv else 0)(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    singles = [t.clone().requires_grad_() for t in (q, k, v)]
    each = torch.stack([flash_attention(singles[0][i], *((singles[1], singles[2]) if shared_kv
                                                         else (singles[1][i], singles[2][i])))
                        for i in range(M)])
    want = torch.autograd.grad(each, singles, do, retain_graph=True)
    assert torch.equal(out, each)
    assert torch.equal(grads[0], want[0])
    if not shared_kv:
        assert all(torch.equal(g, w) for g, w in zip(grads[1:], want[1:]))
        return
    # the M models' shares of a shared input's gradient, summed in another order: two orders
    # of an M-term fp32 sum differ by at most ~2 (M - 1) u sum|share|, element by element
    shares = [torch.autograd.grad(each[i], singles[1:], do[i], retain_graph=True) for i in range(M)]
    for j, (g, w) in enumerate(zip(grads[1:], want[1:])):
        magnitude = sum(share[j].abs() for share in shares)
        assert ((g - w).abs() <= 2 * (M - 1) * 2.0 ** -24 * magnitude).all()


@pytest.mark.parametrize("args, error, message", [
    (((1, 2, 8, 64), (1, 2, 8, 64), (1, 2, 8, 32)), ValueError, "same shape"),
    (((1, 3, 8, 64), (1, 2, 8, 64), (1, 2, 8, 64)), ValueError, "must divide"),
    (((1, 2, 8, 48), (1, 2, 8, 48), (1, 2, 8, 48)), ValueError, "head_dim"),
    (((1, 2, 8), (1, 2, 8), (1, 2, 8)), ValueError, "4 dims"),
    (((2, 2, 8, 64), (1, 2, 8, 64), (1, 2, 8, 64)), ValueError, "batch"),
    (((1, 2, 0, 64), (1, 2, 8, 64), (1, 2, 8, 64)), ValueError, ">= 1"),
])
def test_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        flash_attention(*(torch.randn(*s, device=DEVICE) for s in args))


def test_bad_dtype_and_scale():
    x = torch.randn(1, 2, 8, 64, device=DEVICE)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(x, x.half(), x)
    with pytest.raises(TypeError, match="float16"):
        flash_attention(x.double(), x.double(), x.double())
    with pytest.raises(ValueError, match="scale"):
        flash_attention(x, x, x, scale=0.0)


def test_torch_compile_fullgraph_has_no_graph_break():
    q, k, v = (t.requires_grad_() for t in _inputs((1, 2, 2, 20, 20, 32, True), torch.float32)[:3])

    def f(q, k, v):
        return (flash_attention(q, k, v) * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.backward()
    torch.testing.assert_close(out, f(q, k, v))
    assert q.grad is not None and k.grad is not None


@pytest.mark.parametrize("model", ["gpt2-1-2", "llama-1-2", "mistral-1-4", "gpt2moe-1-2"])
def test_models_train_alike_with_either_attention(tmp_path, model):
    from kcap.train import DataConfig, TrainConfig, read_log, train

    losses = {}
    for impl in ("torch", "triton"):
        cfg = TrainConfig(model=model, model_options={"attn_impl": impl}, data=DataConfig(n=40),
                          exposures=2, window=128, batch_size=2, steps=4, log_every=1,
                          checkpoint_every=0, eval_sample=8, device=DEVICE)
        report = train(cfg, tmp_path / impl, progress=False)
        losses[impl] = [r["loss"] for r in read_log(tmp_path / impl) if "loss" in r]
        losses[impl + " bits"] = report["bits_learned"]
    # fp32 on CPU: the two attentions differ by float rounding only (~1e-6 relative).
    assert losses["torch"] == pytest.approx(losses["triton"], rel=1e-4)
    assert losses["torch bits"] == pytest.approx(losses["triton bits"], rel=1e-4, abs=1e-2)


# Every autotuning candidate alone (autotuning keeps whichever is fastest, so a wrong one would
# only show on the shapes where it wins). Two backward candidates failed this on an H100.
CANDIDATE_CASES = ([(2, 8, 2, 17, 90, 128, False), (1, 2, 2, 70, 70, 128, True),
                    (2, 8, 2, 17, 90, 64, False), (1, 4, 1, 130, 130, 64, True)] if CUDA else
                   [(1, 2, 1, 70, 70, 32, True), (1, 2, 2, 33, 50, 32, False),
                    (1, 1, 1, 300, 300, 32, True)])  # several 128-row blocks under the causal band
CANDIDATE_DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]


def _candidates():
    from kcap.kernels import attention as A

    # trials (KCAP_TRIAL_CANDIDATES, kernels/runtime.py) included: this is their GPU test
    # (`-k "every_autotune and trial"` selects them)
    out = []
    for which, candidates in (("fwd", A.FWD_CANDIDATES), ("fwd-trial", A.FWD_TRIALS)):
        out += [(which, i, ((A._fwd_kernel, c),)) for i, c in enumerate(candidates)]
    for which, candidates in (("bwd", A.BWD_CANDIDATES), ("bwd-trial", A.BWD_TRIALS)):
        out += [(which, i, ((A._bwd_dkdv_kernel, c), (A._bwd_dq_kernel, c)))
                for i, c in enumerate(candidates)]
    return out


@pytest.mark.parametrize("which, index, pins", _candidates(), ids=lambda v: v if isinstance(v, (str, int)) else "")
def test_every_autotune_candidate(which, index, pins):
    with pinned(*pins):
        for case in CANDIDATE_CASES:
            for dtype in CANDIDATE_DTYPES:
                _check(case, dtype)
