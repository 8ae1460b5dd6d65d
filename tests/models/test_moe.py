"""The router (C++ and torch reference) against a brute-force definition and each other,
its invariants (hypothesis), its refusals, and the MoE layer's two expert paths."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kcap.models import build_model
from kcap.models.router import MAX_EXPERTS, cpp_available, route, route_reference

CPP = cpp_available("cpu")
FIELDS = ["expert", "dropped", "counts", "offsets", "perm", "inverse", "padded_perm", "block_expert"]


def brute_force(logits, k, factor):
    T, E = logits.shape
    choices = [sorted(range(E), key=lambda e: (-logits[t, e].item(), e))[:k] for t in range(T)]
    capacity = T * k if factor is None else math.ceil(factor * T * k / E)
    filled, position = [0] * E, [[0] * k for _ in range(T)]
    for j in range(k):
        for t in range(T):
            position[t][j] = filled[choices[t][j]]
            filled[choices[t][j]] += 1
    return choices, position, capacity


def _logits(T, E, seed=0, dtype=torch.float32, ties=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if ties and T and E > 1:
        logits[::3, 0] = logits[::3, -1]
    return logits.to(dtype)


CASES = [(17, 4, 1, 1.0), (33, 8, 2, 1.25), (5, 3, 3, 1.0), (1, 4, 1, 2.0), (12, 1, 1, 0.5),
         (40, 32, 1, 2.0), (40, 32, 2, 8.0), (0, 4, 1, 2.0), (9, 5, 5, None), (64, 6, 2, None)]


@pytest.mark.parametrize("T, E, k, factor", CASES)
def test_reference_matches_brute_force(T, E, k, factor):
    logits = _logits(T, E)
    r = route_reference(logits, k, factor, block=4)
    choices, position, capacity = brute_force(logits, k, factor)
    assert r.capacity == capacity and r.expert.tolist() == choices
    assert r.dropped.tolist() == [[p >= capacity for p in row] for row in position]
    if k > 1 and T:
        torch.testing.assert_close(r.gate.sum(-1), torch.ones(T))


@pytest.mark.skipif(not CPP, reason="C++ router not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, E, k, factor", CASES)
def test_cpp_router_agrees_exactly(T, E, k, factor, dtype):
    logits = _logits(T, E, seed=T + E, dtype=dtype)
    a, b = route(logits, k, factor, block=4, impl="cpp"), route_reference(logits, k, factor, block=4)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.capacity == b.capacity and torch.equal(a.frac, b.frac)
    torch.testing.assert_close(a.gate, b.gate, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.mean_prob, b.mean_prob, rtol=1e-6, atol=1e-7)
    assert float(a.z_loss) == pytest.approx(float(b.z_loss), rel=1e-5, abs=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(T=st.integers(0, 60), E=st.integers(1, 9), k_frac=st.floats(0, 1), factor=st.sampled_from([None, 0.5, 1.0, 2.0]),
       block=st.sampled_from([1, 4, 16]), seed=st.integers(0, 1000))
def test_routing_invariants(T, E, k_frac, factor, block, seed):
    k = 1 + int(k_frac * (E - 1))
    r = route(_logits(T, E, seed), k, factor, block=block)
    kept = (~r.dropped).reshape(-1).nonzero().flatten()
    assert sorted(r.perm.tolist()) == kept.tolist()  # every kept slot exactly once
    assert torch.equal(r.inverse[r.perm], torch.arange(len(r.perm)))
    assert (r.inverse[r.dropped.reshape(-1)] == -1).all()
    assert (r.counts <= r.capacity).all() and int(r.offsets[-1]) == len(r.perm)
    assert torch.equal(r.expert.reshape(-1)[r.perm], torch.sort(r.expert.reshape(-1)[r.perm]).values)
    # gather then scatter is the identity on kept slots
    values = torch.randn(T * k)
    gathered = values[r.perm]
    back = torch.zeros(T * k)
    back[r.perm] = gathered
    assert torch.equal(back[kept], values[kept])
    # padded: whole blocks, each holding one expert's slots, padding marked -1
    assert len(r.padded_perm) == len(r.block_expert) * block
    for b, e in enumerate(r.block_expert.tolist()):
        run = r.padded_perm[b * block:(b + 1) * block]
        assert all(r.expert.reshape(-1)[s] == e for s in run.tolist() if s >= 0)
    assert sorted(s for s in r.padded_perm.tolist() if s >= 0) == kept.tolist()


@pytest.mark.parametrize("impl", ["torch"] + (["cpp"] if CPP else []))
@pytest.mark.parametrize("make, error, message", [
    (lambda: torch.zeros(4, 3, dtype=torch.int64), TypeError, "float32"),
    (lambda: torch.zeros(4, 3, dtype=torch.float64), TypeError, "float32"),
    (lambda: torch.zeros(3, 4).t(), ValueError, "contiguous"),
    (lambda: torch.zeros(3), ValueError, "shape"),
    (lambda: torch.zeros(2, MAX_EXPERTS + 1), ValueError, "experts"),
    (lambda: torch.tensor([[0.0, float("nan")]]), ValueError, "NaN or inf"),
    (lambda: torch.tensor([[0.0, float("inf")]]), ValueError, "NaN or inf"),
])
def test_bad_logits_are_clear_errors(impl, make, error, message):
    with pytest.raises(error, match=message):
        route(make(), 1, 2.0, impl=impl)


@pytest.mark.parametrize("k, factor, block, message", [(0, 2.0, 4, "k must be"), (4, 2.0, 4, "k must be"),
                                                        (1, 0.0, 4, "capacity_factor"), (1, 2.0, 0, "block")])
def test_bad_arguments(k, factor, block, message):
    with pytest.raises(ValueError, match=message):
        route(torch.zeros(5, 3), k, factor, block=block)


def test_cpp_router_refuses_other_devices():
    with pytest.raises(RuntimeError, match="no C\\+\\+ router for meta"):
        route(torch.zeros(4, 3, device="meta"), 1, impl="cpp")


CUDA_ROUTER = torch.cuda.is_available() and cpp_available("cuda")


@pytest.mark.skipif(not CUDA_ROUTER, reason="needs a GPU and the CUDA router")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, E, k, factor", CASES + [(65_536, 32, 1, 2.0), (65_536, 32, 2, 2.0), (300, 1024, 2, 1.0)])
def test_cuda_router_agrees_exactly_and_never_syncs(T, E, k, factor, dtype):
    logits = _logits(T, E, seed=T + E, dtype=dtype).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = route(logits, k, factor, block=16, impl="cpp")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    b = route_reference(logits.cpu(), k, factor, block=16)
    n_kept, n_padded, n_blocks = a.sizes.tolist()
    trimmed = {"perm": a.perm[:n_kept], "padded_perm": a.padded_perm[:n_padded],
               "block_expert": a.block_expert[:n_blocks]}
    for f in FIELDS:
        assert torch.equal(trimmed.get(f, getattr(a, f)).cpu(), getattr(b, f)), f
    assert (a.perm[n_kept:] == -1).all() and (a.padded_perm[n_padded:] == -1).all()
    assert (a.block_expert[n_blocks:] == -1).all() and int(a.non_finite) == 0
    torch.testing.assert_close(a.gate.cpu(), b.gate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.frac.cpu(), b.frac)


@pytest.mark.skipif(not CUDA_ROUTER, reason="needs a GPU and the CUDA router")
def test_cuda_router_drops_non_finite_tokens():
    logits = torch.randn(8, 4, device="cuda")
    logits[3, 1] = float("nan")
    r = route(logits, 2, None, block=16, impl="cpp")
    assert int(r.non_finite) == 1 and r.dropped[3].all() and not r.dropped[torch.arange(8) != 3].any()


def test_moe_grouped_path_matches_loop():
    pytest.importorskip("triton")
    from kcap.kernels.runtime import INTERPRET
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    for k in (1, 2):
        torch.manual_seed(k)
        dev = "cpu" if INTERPRET else "cuda"
        loop = build_model("gpt2moe-1-1", 100, n_experts=4, top_k=k, mlp_impl="torch").to(dev)
        fast = build_model("gpt2moe-1-1", 100, n_experts=4, top_k=k, mlp_impl="triton").to(dev)
        fast.load_state_dict(loop.state_dict())
        x = torch.randn(2, 50, 64, device=dev, requires_grad=True)
        outs = [m.blocks[0].mlp(x) for m in (loop, fast)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        grads = [torch.autograd.grad(o.sum(), [x, m.blocks[0].mlp.w1, m.blocks[0].mlp.router.weight])
                 for o, m in zip(outs, (loop, fast))]
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_dropped_tokens_pass_through_as_zero_mlp_output():
    torch.manual_seed(0)
    model = build_model("gpt2moe-1-1", 50, n_experts=2, top_k=1, capacity_factor_train=0.25)
    moe = model.blocks[0].mlp.train()
    out = moe(torch.randn(1, 16, 64))
    dropped = moe.last_routing.dropped[:, 0]
    assert dropped.any() and (out.view(16, 64)[dropped] == 0).all()
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_moe_equals_dense_mixture_when_every_expert_is_used(impl):
    from kcap.kernels.runtime import INTERPRET
    if impl == "triton" and not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    dev = "cuda" if impl == "triton" and not INTERPRET else "cpu"
    model = build_model("gpt2moe-1-1", 50, n_experts=4, top_k=4, mlp_impl=impl).to(dev)
    moe = model.blocks[0].mlp.eval()
    x = torch.randn(2, 7, 64, device=dev)
    probs = torch.softmax(moe.router(x).float(), -1)
    expert_out = torch.stack([torch.nn.functional.gelu(x @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]
                              for e in range(4)], -1)
    torch.testing.assert_close(moe(x), (expert_out * probs[..., None, :]).sum(-1), rtol=1e-5, atol=1e-6)
