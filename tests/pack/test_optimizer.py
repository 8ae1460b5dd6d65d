"""StackedAdamW against the solo trainer's optimizer: one step bit for bit, 200 steps of
training within a stated tolerance (and broken variants far outside it), per-model state
in torch.optim.AdamW's format both ways, and the refusals.

Training tolerance: the optimizer math is torch's op for op (a step with equal gradients
gives equal bits, tested below), so pack and solo differ only by the gradients' fp32
reassociation (~1e-7 of each gradient tensor's largest entry, tests/pack/test_stacked.py).
Adam turns a relative gradient error into a relative update error of the same size, except
where a gradient entry is itself rounding noise (it cancels): there the update m/sqrt(v)
can change by up to ~1, i.e. by up to lr per step, and the trajectories then drift apart
with the steps. The bound is therefore ``DRIFT * lr_max * t`` after t steps (lr_max 5e-3 here), with
DRIFT = 5e-4 set from measurement: the actual divergence is at most 0.052 of the bound at
every checkpoint (1.3e-5 against 2.5e-4 after 100 steps: a 19x margin), while the broken
variants (another model's lr, decay on every tensor, no bias correction, clipping by the
pack's joint norm) end 100x to 820x above it after 100 steps.
"""
import types
from unittest import mock

import pytest
import torch

from kcap.budget import learning_rate
from kcap.models import build_model
from kcap.pack import StackedAdamW, StackedModels, optimizer
from kcap.pack.optimizer import _COLUMNS, decayed
from kcap.train import _optimizer

V, CONTEXT, T = 97, 32, 31
BETAS, EPS = (0.9, 0.98), 1e-6  # TrainConfig's defaults
SOLO_CFG = types.SimpleNamespace(betas=BETAS, eps=EPS)  # what _optimizer reads of a TrainConfig
CPU = torch.device("cpu")
STEPS = 200
CHECKPOINTS = (1, 10, 50, 100, 120, 200)
# seed, peak lr, weight decay, batch, steps (the last stops early), warmup, max grad norm
SPECS = [dict(seed=0, lr=3e-3, wd=0.1, batch=3, steps=STEPS, warmup=20, clip=0.4),
         dict(seed=1, lr=1e-3, wd=0.02, batch=5, steps=STEPS, warmup=10, clip=1.0),
         dict(seed=2, lr=5e-3, wd=0.05, batch=4, steps=120, warmup=12, clip=0.6)]
DRIFT = 5e-4  # bound: DRIFT * max lr * steps done (see the module docstring)


def model(seed):
    torch.manual_seed(seed)
    return build_model("gpt2-1-2", V, context=CONTEXT)


def windows(i, step, batch):
    """Model i's batch at a step: arithmetic sequences mod V, ragged (PAD targets -100)."""
    g = torch.Generator().manual_seed(1000 * i + step)
    start = torch.randint(0, V, (batch, 1), generator=g)
    stride = torch.randint(1, 6, (batch, 1), generator=g)
    tokens = (start + stride * torch.arange(T + 1)) % V
    lengths = torch.randint(T // 2, T + 2, (batch, 1), generator=g)
    ids, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    targets[torch.arange(T) >= lengths - 1] = -100
    return ids, targets


def lr_at(spec, step):
    return learning_rate(min(step, spec["steps"] - 1), spec["steps"], spec["lr"], spec["warmup"])


def run_solo(spec, i):
    """The solo trainer's loop (kcap.train._train in fp32): snapshots at CHECKPOINTS."""
    m = model(spec["seed"])
    opt = _optimizer(m, SOLO_CFG, spec["lr"], spec["wd"], CPU)
    snaps = {}
    for step in range(STEPS):
        if step < spec["steps"]:
            for group in opt.param_groups:
                group["lr"] = lr_at(spec, step)
            _, loss = m(*windows(i, step, spec["batch"]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), spec["clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step + 1 in CHECKPOINTS:
            snaps[step + 1] = {n: p.detach().clone() for n, p in m.named_parameters()}
    return snaps, m, opt


def pack_batch(step, specs):
    """The models' batches padded to the largest (rows of ids 0, targets -100); a finished
    model gets an all-ignored batch."""
    width = max(s["batch"] for s in specs)
    ids = torch.zeros(len(specs), width, T, dtype=torch.long)
    targets = torch.full((len(specs), width, T), -100, dtype=torch.long)
    for i, s in enumerate(specs):
        if step < s["steps"]:
            ids[i, :s["batch"]], targets[i, :s["batch"]] = windows(i, step, s["batch"])
    return ids, targets


def run_pack(specs=SPECS, opt_cls=StackedAdamW, lrs_of=lambda lrs: lrs, decay_all=False, steps=STEPS):
    pack = StackedModels([model(s["seed"]) for s in specs])
    with mock.patch.object(optimizer, "decayed", (lambda ndim: True) if decay_all else decayed):
        opt = opt_cls(pack, lr=[s["lr"] for s in specs], weight_decay=[s["wd"] for s in specs],
                      betas=BETAS, eps=EPS, max_grad_norm=[s["clip"] for s in specs])
    snaps = {}
    for step in range(steps):
        _, losses = pack(*pack_batch(step, specs))
        losses.sum().backward()
        opt.step(lrs_of([lr_at(s, step) for s in specs]), [step < s["steps"] for s in specs])
        opt.zero_grad()
        if step + 1 in CHECKPOINTS:
            snaps[step + 1] = pack.unstack()
    return snaps, pack, opt


@pytest.fixture(scope="module")
def solo():
    return [run_solo(s, i) for i, s in enumerate(SPECS)]


def divergence(pack_snaps, solo, t):
    """Largest |pack - solo| weight difference over models and tensors after t steps."""
    return max((pack_snaps[t][i][n] - ref).abs().max().item()
               for i, (snaps, _, _) in enumerate(solo) for n, ref in snaps[t].items())


def bound(t):
    return DRIFT * max(s["lr"] for s in SPECS) * t


def test_one_step_with_equal_gradients_is_bitwise_adamw():
    specs = SPECS
    models = [model(s["seed"]) for s in specs]
    pack = StackedModels(models)
    opt = StackedAdamW(pack, lr=[s["lr"] for s in specs], weight_decay=[s["wd"] for s in specs],
                       betas=BETAS, eps=EPS, max_grad_norm=[0.5, 0.0, 2.0])
    solo = [_optimizer(m, SOLO_CFG, s["lr"], s["wd"], CPU) for m, s in zip(models, specs)]
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        active = [True, True, step < 3]
        lrs = [s["lr"] * 0.9 ** step for s in specs]
        pack.flat.grad = torch.randn(pack.flat.shape, generator=g) * 0.3 * (step + 1)
        for n, grad in pack.named_grads():
            for i, m in enumerate(models):
                dict(m.named_parameters())[n].grad = grad[i].clone()
        norms = opt.step(torch.tensor(lrs, dtype=torch.float64), torch.tensor(active))
        for i, m in enumerate(models):
            if active[i]:
                for group in solo[i].param_groups:
                    group["lr"] = lrs[i]
                if opt.max_grad_norm[i]:
                    solo_norm = torch.nn.utils.clip_grad_norm_(m.parameters(), opt.max_grad_norm[i])
                    assert torch.equal(solo_norm, norms[i])
                solo[i].step()
    for i, m in enumerate(models):
        assert opt.steps[i] == (6 if i < 2 else 3)
        assert_same_state(opt.state_for_model(i), solo[i].state_dict())
        for n, p in pack.named_stacked():
            assert torch.equal(p[i], dict(m.named_parameters())[n]), (i, n)


def assert_same_state(ours, ref):
    """Equal optimizer state_dicts: param groups, state keys (in order) and tensors, bit for bit."""
    assert ours["param_groups"] == ref["param_groups"]
    assert list(ours["state"]) == list(ref["state"])
    for j, st in ref["state"].items():
        assert list(ours["state"][j]) == list(st)
        for k, v in st.items():
            assert torch.equal(ours["state"][j][k], v) and ours["state"][j][k].dtype == v.dtype, (j, k)


def random_grads(pack, g):
    pack.flat.grad = torch.randn(pack.flat.shape, generator=g)


def test_model_state_round_trips_and_resumes_bitwise():
    specs = SPECS
    make = lambda: StackedModels([model(s["seed"]) for s in specs])  # noqa: E731
    pack = make()
    opt = StackedAdamW(pack, lr=[s["lr"] for s in specs], weight_decay=[s["wd"] for s in specs],
                       betas=BETAS, eps=EPS, max_grad_norm=1.0)
    fresh = _optimizer(model(0), SOLO_CFG, specs[0]["lr"], specs[0]["wd"], CPU)
    assert_same_state(opt.state_for_model(0), fresh.state_dict())  # before any step: no state
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        random_grads(pack, g)
        opt.step([1e-3, 2e-3, 3e-3], [True, step < 2, True])
    # into a solo torch AdamW (the trainer's groups) and back, unchanged
    for i in range(3):
        solo = _optimizer(model(i), SOLO_CFG, 1.0, 0.0, CPU)
        solo.load_state_dict(opt.state_for_model(i))
        assert_same_state(opt.state_for_model(i), solo.state_dict())
    # into another pack (other hyperparameters, models in another order): resumes bit for bit
    other = make()
    other.load_states(pack.unstack()[::-1])
    resumed = StackedAdamW(other, lr=0.5, weight_decay=0.3, betas=(0.5, 0.5), eps=1e-3, max_grad_norm=1.0)
    for i in range(3):
        resumed.load_model_state(2 - i, opt.state_for_model(i))
    assert resumed.steps == [4, 2, 4] and resumed.weight_decay == [s["wd"] for s in specs][::-1]
    random_grads(pack, g)
    other.flat.grad = pack.flat.grad.flip(0)
    opt.step([1e-3, 2e-3, 3e-3])
    resumed.step([3e-3, 2e-3, 1e-3])
    for (n, a), (_, b) in zip(pack.named_stacked(), other.named_stacked()):
        assert torch.equal(a, b.flip(0)), n
    for i in range(3):
        assert_same_state(resumed.state_for_model(2 - i), opt.state_for_model(i))


def test_refusals():
    pack = StackedModels([model(0), model(1)])
    step = lambda *args: StackedAdamW(pack).step(*args)  # noqa: E731
    cases = [(lambda: StackedAdamW(torch.nn.Linear(2, 2)), TypeError, "needs a StackedModels"),
             (lambda: StackedAdamW(pack, lr=[1e-3] * 3), ValueError, "lr needs a float or 2 values, got 3"),
             (lambda: StackedAdamW(pack, lr="fast"), TypeError, "lr values must be finite numbers"),
             (lambda: StackedAdamW(pack, weight_decay=-0.1), ValueError, "weight_decay values must be >= 0"),
             (lambda: StackedAdamW(pack, betas=(0.9, 1.0)), ValueError, r"betas\[1\] values must be .* < 1.0"),
             (lambda: StackedAdamW(pack, betas=0.9), ValueError, "betas must be a pair"),
             (lambda: StackedAdamW(pack, eps=0.0), ValueError, "eps values must be > 0"),
             (lambda: StackedAdamW(pack, max_grad_norm=float("inf")), TypeError, "finite"),
             (lambda: step([1e-3] * 3), ValueError, "lrs needs a float or 2 values, got 3"),
             (lambda: step(1e-3, torch.ones(2)), ValueError, "bool tensor of shape"),
             (lambda: step(1e-3, [True]), ValueError, "active must be 2 bools"),
             (lambda: StackedAdamW(pack).state_for_model(2), ValueError, r"model index must be an int in \[0, 2\)")]
    for make, err, msg in cases:
        with pytest.raises(err, match=msg) as e:
            make()
        assert "\n" not in str(e.value)
    opt = StackedAdamW(pack)
    random_grads(pack, torch.Generator().manual_seed(0))
    opt.step([1e-3, 1e-3])
    good = opt.state_for_model(0)
    bad = {"state": good["state"], "param_groups": good["param_groups"][:1]}
    with pytest.raises(ValueError, match="the solo trainer's two groups"):
        opt.load_model_state(1, bad)
    bad = {"state": dict(list(good["state"].items())[1:]), "param_groups": good["param_groups"]}
    with pytest.raises(ValueError, match="all 17 parameters or none"):
        opt.load_model_state(1, bad)
    bad = opt.state_for_model(0)
    bad["param_groups"][1]["weight_decay"] = 0.1
    with pytest.raises(ValueError, match="weight_decay 0 on group 1"):
        opt.load_model_state(1, bad)
    bad = opt.state_for_model(0)
    bad["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg has shape"):
        opt.load_model_state(1, bad)
    with pytest.raises(ValueError, match="exactly the keys"):
        opt.load_model_state(1, {"state": {}})


def test_decayed_tensors_are_the_solo_trainers():
    m = model(0)
    opt = StackedAdamW(StackedModels([m]))
    solo = _optimizer(m, SOLO_CFG, 1e-3, 0.1, CPU)
    names = {id(p): n for n, p in m.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in solo.param_groups] == list(opt.groups)
    assert decayed(2) and not decayed(1)


def test_training_matches_solo_runs_within_the_drift_bound(solo):
    snaps, _, opt = run_pack()
    assert opt.steps == [s["steps"] for s in SPECS]
    for t in CHECKPOINTS:
        d = divergence(snaps, solo, t)
        print(f"step {t}: divergence {d:.3g}, bound {bound(t):.3g}, ratio {d / bound(t):.3f}")
        assert d <= bound(t), (t, d, bound(t))
    # the early stopper froze at its last step: not one bit changed afterwards
    assert all(torch.equal(snaps[STEPS][2][n], w) for n, w in snaps[SPECS[2]["steps"]][2].items())


class NoBiasCorrection(StackedAdamW):
    def _table(self, lrs, active):
        table = super()._table(lrs, active)
        table[:, _COLUMNS.index("neg_step_size")] = -torch.tensor(lrs, dtype=table.dtype)
        table[:, _COLUMNS.index("bias_correction2_sqrt")] = 1.0
        return table


class JointNormClipping(StackedAdamW):
    def _clip(self, grad, max_norm):
        total = torch.linalg.vector_norm(grad)
        coef = ((total + 1e-6).reciprocal() * max_norm).clamp(max=1.0)
        grad.mul_(coef)
        return total.expand(self.m)


BROKEN_STEPS = 100  # enough to tell, half the time
BREAKS = {"lr of another model": dict(lrs_of=lambda lrs: lrs[1:] + lrs[:1]),
          "decay on every tensor": dict(decay_all=True),
          "no bias correction": dict(opt_cls=NoBiasCorrection),
          "clipping by the joint norm": dict(opt_cls=JointNormClipping)}


@pytest.mark.parametrize("breakage", list(BREAKS))
def test_broken_variants_fail_by_a_wide_factor(solo, breakage):
    snaps, _, _ = run_pack(steps=BROKEN_STEPS, **BREAKS[breakage])
    d = divergence(snaps, solo, BROKEN_STEPS)
    print(f"{breakage}: divergence {d:.3g} = {d / bound(BROKEN_STEPS):.1f} x the bound")
    assert d > 10 * bound(BROKEN_STEPS)
