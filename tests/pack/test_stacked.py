"""StackedModels against the solo Transformers it packs: logits, per-model losses and
gradients (fp32, CPU), ignored targets, the unstack/load round trip and the refusals.

Tolerances: fp32 reassociation. A length-K dot product summed in another order differs by
at most ~K u sum|a_i b_i| (u = 2^-24), typically sqrt(K) u |a||b|; the pack's batched
matmuls and its per-model loss sums only reorder sums, so each comparison allows
8 sqrt(K) u of the compared tensor's magnitude, K the longest reduction feeding it (d for
logits, B*T tokens for the loss, max(B*T, 4d) for gradients). Measured on this CPU (one
thread, as these tests run): logits bit for bit equal in all four cases; losses within 1
ulp (0.027 of the bound); gradients within 5.3e-7 of their tensor's largest entry (0.049
of the bound): a margin of 20x or more.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from kcap.models import build_model
from kcap.pack import StackedModels, stacked

V, CONTEXT, B, T = 97, 40, 3, 29
U = 2.0 ** -24  # fp32 unit roundoff
CASES = [("gpt2-1-2", {}), ("llama-1-2", {}), ("llama-1-2", {"tied": True}), ("mistral-1-4", {})]


def solo_models(name, seeds=(0, 1, 2), **overrides):
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(build_model(name, V, context=CONTEXT, **overrides))
    return models


def batch(m, seed=0, ignore=0.2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (m, B, T), generator=g)
    targets = torch.randint(0, V, (m, B, T), generator=g)
    targets[torch.rand(m, B, T, generator=g) < ignore] = -100
    return ids, targets


def bound(k, magnitude, factor=8.0):
    """factor * sqrt(k) * u * magnitude: the reassociation allowance of a length-k sum."""
    return factor * math.sqrt(k) * U * magnitude


@pytest.mark.parametrize("name, overrides", CASES, ids=[f"{n}{'-tied' if o else ''}" for n, o in CASES])
def test_forward_and_gradients_match_solo(name, overrides):
    models = solo_models(name, **overrides)
    pack = StackedModels(models)
    ids, targets = batch(len(models))
    logits, losses = pack(ids, targets)
    assert logits.shape == (3, B, T, V) and losses.shape == (3,) and losses.dtype == torch.float32
    losses.sum().backward()
    d = models[0].cfg.d_model
    for i, m in enumerate(models):
        solo_logits, solo_loss = m(ids[i], targets[i])
        solo_loss.backward()
        err = (logits[i] - solo_logits).abs().max().item()
        assert err <= bound(d, solo_logits.abs().max().item()), (i, err)
        n = int((targets[i] != -100).sum())
        assert abs(losses[i].item() - solo_loss.item()) <= bound(n, solo_loss.item())
        solo = dict(m.named_parameters())
        for pname, grad in pack.named_grads():
            g, ref = grad[i], solo[pname].grad
            k = max(B * T, 4 * d)
            assert (g - ref).abs().max().item() <= bound(k, ref.abs().max().item()), pname


def test_compiled_pack_matches_the_eager_pack():
    """torch.compile (inductor on the CPU) of the pack: fused kernels sum in other orders,
    so logits, losses and gradients agree within the reassociation bound above (the
    trainer's compile = true runs this; tests/pack/test_trainer.py checks the wiring)."""
    models = solo_models("gpt2-1-2")
    pack = StackedModels(models)
    ids, targets = batch(len(models), seed=2)
    logits, losses = pack(ids, targets)
    losses.sum().backward()
    grads = pack.flat.grad.clone()
    pack.flat.grad = None
    c_logits, c_losses = torch.compile(pack)(ids, targets)
    c_losses.sum().backward()
    d = models[0].cfg.d_model
    worst, ref_grads = 0.0, pack._blocks(grads)
    for i in range(len(models)):
        n = int((targets[i] != -100).sum())
        pairs = [(c_logits[i], logits[i], d), (c_losses[i], losses[i], n)]
        pairs += [(g[i], ref_grads[name][i], max(B * T, 4 * d)) for name, g in pack.named_grads()]
        for got, ref, k in pairs:
            ratio = (got - ref).abs().max().item() / bound(k, ref.abs().max().item())
            worst = max(worst, ratio)
    print(f"compiled vs eager pack: worst error {worst:.3f} of the bound")
    assert worst <= 1.0


@pytest.mark.parametrize("tied", [False, True], ids=["gpt2", "llama-tied"])
def test_fused_loss_matches_the_torch_loss(tied):
    """loss_impl triton (the CUDA default; here the Triton interpreter): the models' heads
    and losses through kcap.kernels.stacked_linear_cross_entropy (one call for all), no
    logits. It sums the same fp32 products in other orders (chunked matmuls, an online log-sum-exp), so losses and
    gradients agree with the torch loss within the reassociation bound above; a model
    with no targets left still gets 0 and no gradient."""
    name, overrides = ("llama-1-2", {"tied": True}) if tied else ("gpt2-1-2", {})
    ids, targets = batch(3, seed=3)
    targets[1] = -100
    results = []
    for impl in ("torch", "triton"):
        pack = StackedModels(solo_models(name, loss_impl=impl, **overrides))
        logits, losses = pack(ids, targets)
        losses.sum().backward()
        results.append((logits, losses.detach(), dict(pack.named_grads())))
    (_, want, want_grads), (logits, got, got_grads) = results
    assert logits is None and got[1].item() == 0.0
    d = build_model(name, V, context=CONTEXT, **overrides).cfg.d_model
    worst = 0.0
    for i in range(3):
        n = max(1, int((targets[i] != -100).sum()))
        worst = max(worst, abs(got[i].item() - want[i].item()) / bound(n, max(want[i].item(), 1.0)))
        for pname, ref in want_grads.items():
            err = (got_grads[pname][i] - ref[i]).abs().max().item()
            if i == 1:
                assert err == 0.0, pname  # the finished model: exactly no gradient
            else:
                worst = max(worst, err / bound(max(B * T, 4 * d), ref[i].abs().max().item()))
    print(f"fused vs torch loss in a pack: worst error {worst:.3f} of the bound")
    assert worst <= 1.0


def test_all_ignored_targets_give_zero_loss_and_no_gradient():
    models = solo_models("gpt2-1-2")
    pack = StackedModels(models)
    ids, targets = batch(3, seed=1)
    targets[1] = -100
    logits, losses = pack(ids, targets)
    losses.sum().backward()
    assert losses[1].item() == 0.0 and torch.isfinite(losses).all()
    for _, grad in pack.named_grads():
        assert torch.count_nonzero(grad[1]) == 0
        assert torch.count_nonzero(grad[0]) > 0
    solo_logits, solo_loss = models[2](ids[2], targets[2])  # the others are unaffected
    assert abs(losses[2].item() - solo_loss.item()) <= bound(B * T, solo_loss.item())


def test_attention_is_one_folded_call_without_vmap_fallback(monkeypatch):
    pack = StackedModels(solo_models("mistral-1-4"))
    ids, _ = batch(3)
    calls = []

    def record(q, k, v, **options):
        calls.append(tuple(q.shape))
        return F.scaled_dot_product_attention(q, k, v, **options)

    monkeypatch.setattr(stacked, "_sdpa", record)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap's per-model fallback loop would warn
        pack(ids)
    assert calls == [(3 * B, 4, T, 64)]  # one call per layer, the models folded into the batch


def test_triton_attention_runs_folded_and_matches_sdpa(monkeypatch):
    """attn_impl triton (the CUDA default; here the Triton interpreter, fp32): the flash
    attention op's vmap rule makes one kernel call per layer over M * B rows, forward and
    backward, and the pack agrees with its SDPA twin within the reassociation bound."""
    from kcap.kernels import attention

    calls = []

    def recording(name, q_at):  # the kernel wrapper, noting the shape of its q
        real = getattr(attention, name)

        def run(*args):
            calls.append((name, tuple(args[q_at].shape)))
            return real(*args)
        return run

    monkeypatch.setattr(attention, "_forward", recording("_forward", 0))
    monkeypatch.setattr(attention, "_backward", recording("_backward", 1))
    ids, targets = batch(3, seed=4)
    results = []
    for impl in ("torch", "triton"):
        pack = StackedModels(solo_models("mistral-1-4", attn_impl=impl))
        logits, losses = pack(ids, targets)
        losses.sum().backward()
        results.append((logits.detach(), losses.detach(), dict(pack.named_grads())))
    assert calls == [("_forward", (3 * B, 4, T, 64)), ("_backward", (3 * B, 4, T, 64))]
    (want_logits, want, want_grads), (got_logits, got, got_grads) = results
    d = build_model("mistral-1-4", V, context=CONTEXT).cfg.d_model
    worst = 0.0
    for i in range(3):
        n = int((targets[i] != -100).sum())
        pairs = [(got_logits[i], want_logits[i], d), (got[i], want[i], n)]
        pairs += [(got_grads[k][i], g[i], max(B * T, 4 * d)) for k, g in want_grads.items()]
        for a, b, k in pairs:
            worst = max(worst, (a - b).abs().max().item() / bound(k, b.abs().max().item()))
    print(f"triton vs SDPA attention in a pack: worst error {worst:.3f} of the bound")
    assert worst <= 1.0


@pytest.mark.parametrize("name", ["gpt2-1-2", "llama-1-2"])
def test_split_mlp_runs_batched_and_matches_the_torch_mlp(name, monkeypatch):
    """mlp_impl split (here in the Triton interpreter, fp32): batched GEMMs and one
    elementwise launch per layer over all models' rows, forward and backward; the pack
    agrees with its torch-MLP twin within the reassociation bound."""
    from kcap.kernels import mlp_elementwise

    launches = []
    real = mlp_elementwise._run
    monkeypatch.setattr(mlp_elementwise, "_run",
                        lambda g, *rest: launches.append(tuple(g.shape)) or real(g, *rest))
    ids, targets = batch(3, seed=5)
    results = []
    for impl in ("torch", "split"):
        pack = StackedModels(solo_models(name, mlp_impl=impl))
        logits, losses = pack(ids, targets)
        losses.sum().backward()
        results.append((logits.detach(), losses.detach(), dict(pack.named_grads())))
    cfg = build_model(name, V, context=CONTEXT).cfg
    hidden = dict(pack.named_stacked())["blocks.0.mlp.up.weight"].shape[1]
    assert launches == [(3 * B * T, hidden)] * 2 * cfg.n_layer
    (want_logits, want, want_grads), (got_logits, got, got_grads) = results
    worst = 0.0
    for i in range(3):
        n = int((targets[i] != -100).sum())
        pairs = [(got_logits[i], want_logits[i], hidden), (got[i], want[i], n)]
        pairs += [(got_grads[k][i], g[i], max(B * T, 4 * cfg.d_model)) for k, g in want_grads.items()]
        for a, b, k in pairs:
            worst = max(worst, (a - b).abs().max().item() / bound(k, b.abs().max().item()))
    print(f"split vs torch MLP in a pack: worst error {worst:.3f} of the bound")
    assert worst <= 1.0


def test_forward_without_targets_and_copies_weights():
    models = solo_models("gpt2-1-2", seeds=(3, 4))
    pack = StackedModels.from_models(models)
    ids, _ = batch(2)
    logits, loss = pack(ids)
    assert loss is None and logits.shape == (2, B, T, V)
    wte = dict(pack.named_stacked())["wte.weight"]
    with torch.no_grad():
        wte.add_(1.0)
    assert not torch.equal(models[0].wte.weight, wte[0])
    assert wte.shape == (2, V, 128) and "lm_head.weight" not in pack.names
    assert torch.equal(dict(pack.named_stacked())["wte.weight"], wte)  # a view of pack.flat


@pytest.mark.parametrize("name, overrides", CASES[:3], ids=["gpt2", "llama", "llama-tied"])
def test_unstack_and_load_round_trip_exactly(name, overrides):
    models = solo_models(name, **overrides)
    pack = StackedModels(models)
    states = pack.unstack()
    for m, sd in zip(models, states):
        solo = m.state_dict()
        assert list(sd) == list(solo)
        assert all(torch.equal(sd[k], solo[k]) and sd[k].shape == solo[k].shape for k in solo)
        if m.cfg.tied:
            assert sd["lm_head.weight"] is sd["wte.weight"]
        fresh = build_model(name, V, context=CONTEXT, **overrides)
        fresh.load_state_dict(sd)  # strict
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), solo.values()))
    other = StackedModels(solo_models(name, seeds=(7, 8, 9), **overrides))
    other.load_states([m.state_dict() for m in models])
    for (n, a), (_, b) in zip(pack.named_stacked(), other.named_stacked()):
        assert torch.equal(a, b), n


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_refusals():
    gpt2 = solo_models("gpt2-1-2", seeds=(0,))[0]
    with pytest.raises(ValueError, match="n_head: 2 vs 4") as e:
        StackedModels([gpt2, build_model("gpt2-1-4", V, context=CONTEXT)])
    assert one_line(e)
    with pytest.raises(ValueError, match="context: 40 vs 50"):
        StackedModels([gpt2, build_model("gpt2-1-2", V, context=50)])
    with pytest.raises(ValueError, match=r"MoE models cannot be packed: the C\+\+ router") as e:
        StackedModels([build_model("gpt2moe-1-2", V, context=CONTEXT)])
    assert one_line(e)
    with pytest.raises(TypeError, match="not a kcap Transformer"):
        StackedModels([gpt2, torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="non-empty list"):
        StackedModels([])
    with pytest.raises(ValueError, match="one device with one dtype"):
        StackedModels([gpt2, solo_models("gpt2-1-2", seeds=(1,))[0].double()])
    pack = StackedModels([gpt2, gpt2])
    ids = torch.zeros(2, B, T, dtype=torch.long)
    for bad, err, msg in [(torch.zeros(B, T, dtype=torch.long), ValueError, r"shape \(M=2, B, T\)"),
                          (torch.zeros(3, B, T, dtype=torch.long), ValueError, r"shape \(M=2, B, T\)"),
                          (ids.float(), TypeError, "int64 tensor"),
                          (ids.tolist(), TypeError, "int64 tensor"),
                          (torch.zeros(2, B, CONTEXT + 1, dtype=torch.long), ValueError, "exceeds")]:
        with pytest.raises(err, match=msg) as e:
            pack(bad)
        assert one_line(e)
    with pytest.raises(ValueError, match="targets must have the shape of ids"):
        pack(ids, ids[:, :, :-1])
    states = pack.unstack()
    with pytest.raises(ValueError, match="list of 2 state_dicts"):
        pack.load_states(states[:1])
    del states[0]["norm_f.bias"]
    with pytest.raises(ValueError, match=r"state 0: missing keys \['norm_f.bias'\]"):
        pack.load_states(states)
    states = pack.unstack()
    states[1]["wte.weight"] = torch.zeros(V, 3)
    with pytest.raises(ValueError, match="state 1: wte.weight has shape"):
        pack.load_states(states)
    states = pack.unstack()
    states[0]["lm_head.weight"] = states[0]["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="tied weights"):
        pack.load_states(states)
