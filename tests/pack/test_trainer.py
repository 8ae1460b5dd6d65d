"""train_pack against the solo trainer: a pack of 3 runs (different seeds, lrs, N, batch
sizes, weight decay, clipping, cadences; one stops early) ends with the weights, reports
and logs of the same runs trained solo; a pack stopped mid-run resumes bit for bit; run
folders pass between pack and solo both ways; incompatible packs are refused.

Weight tolerance: tests/pack/test_optimizer.py's drift bound, DRIFT * lr_max * t after t
steps (DRIFT = 5e-4): pack and solo differ only by fp32 reassociation of the gradients,
which Adam turns into at most ~lr per step where a gradient entry is rounding noise.
Measured here (one thread): the largest |pack - solo| weight difference is 0.044 of the
bound (4.2e-6 against 9.5e-5 after 38 steps), a margin of over 20x.

Report tolerance: bits_learned is a sum over the evaluated people's value tokens of
(log2 of the pool) - (the model's loss in bits); a relative weight difference e moves each
token's loss by O(e) bits, so |d bits| <~ tokens * bits per token * e (~1e3 * 5 * 1e-5 =
0.05 bits here). We allow 1e-6 bits per counted parameter (R equal to 1e-6, ~0.1 bits):
measured 1.8e-3 bits, a margin of over 50x. Logged training losses: relative 1e-4
(measured: at most 5.5e-7).
"""
import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import kcap.pack.trainer as pt
import kcap.train as kt
from kcap import checkpoint
from kcap.pack.trainer import train_pack
from kcap.run_lock import RunFolderBusy, run_lock
from kcap.train import DataConfig, TrainConfig, read_log, train
from stop_training import Stop, stop_at

DRIFT = 5e-4  # tests/pack/test_optimizer.py
BASE = TrainConfig(model="gpt2-1-1", data=DataConfig(n=60, variant="simple"), exposures=4,
                   window=128, batch_size=4, lr=3e-3, eval_sample=20, log_every=2,
                   checkpoint_every=5, warmup_steps=3, keep_checkpoints=10)
CFGS = [BASE,  # 29 steps
        replace(BASE, seed=1, lr=5e-3, data=DataConfig(n=40, variant="simple", seed=3), batch_size=2,
                checkpoint_every=4, log_every=3, eval_every=10),  # 38 steps
        replace(BASE, seed=2, lr=2e-3, data=DataConfig(n=80, variant="simple"), batch_size=3,
                steps=20, weight_decay=0.1, grad_clip=0.5)]  # stops at 20 of its 51 steps
LR_MAX = max(c.lr for c in CFGS)
STOP_AT = 17  # the interrupted pack stops here: runs resume from steps 15, 16 and 15


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(run folders, reports) of CFGS trained as one uninterrupted pack."""
    root = tmp_path_factory.mktemp("pack")
    dirs = [root / f"run{i}" for i in range(len(CFGS))]
    return dirs, train_pack(CFGS, dirs, progress=False)


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """(run folders, reports) of CFGS trained solo, one after another."""
    root = tmp_path_factory.mktemp("solo")
    dirs = [root / f"run{i}" for i in range(len(CFGS))]
    return dirs, [train(c, d, progress=False) for c, d in zip(CFGS, dirs)]


def final_weights(run) -> dict:
    return load_file(str(checkpoint.latest(run) / "model.safetensors"))


def weight_divergence(a, b) -> float:
    wa, wb = final_weights(a), final_weights(b)
    assert sorted(wa) == sorted(wb)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def records(run, kind: str) -> list[dict]:
    return [r for r in read_log(run) if kind in r]


def test_pack_equals_solo_runs(packed, solo):
    for i, (cfg, p, rp, s, rs) in enumerate(zip(CFGS, *packed, *solo)):
        assert rp["steps"] == rs["steps"] == rs["planned_steps"] and rp["tokens"] == rs["tokens"]
        if cfg.steps:
            assert rp["steps"] == cfg.steps  # the short run stopped while the others went on
        d, bound = weight_divergence(p, s), DRIFT * LR_MAX * rp["steps"]
        print(f"run {i}: {rp['steps']} steps, weight divergence {d:.3g} = {d / bound:.3f} of the bound")
        assert d <= bound
        # same report fields; the numbers of the evaluation within the stated tolerance
        assert sorted(rp) == sorted(rs)
        differing = {k for k in rp if rp[k] != rs[k]}
        assert differing <= {"bits_learned", "capacity_ratio", "capacity_ratio_ci95", "param_checksums",
                             "metric"}, differing
        tol = 1e-6 * rs["params_counted"]
        print(f"run {i}: bits {rp['bits_learned'] - rs['bits_learned']:.3g} apart (tolerance {tol:.3g})")
        assert rp["bits_learned"] == pytest.approx(rs["bits_learned"], abs=tol)
        assert rp["capacity_ratio"] == pytest.approx(rs["capacity_ratio"], abs=1e-6)
        # the same log: record keys and steps, losses within rounding
        for kind in ("loss", "eval"):
            lp, ls = records(p, kind), records(s, kind)
            assert [(sorted(r), r["step"]) for r in lp] == [(sorted(r), r["step"]) for r in ls]
        for a, b in zip(records(p, "loss"), records(s, "loss")):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
            assert (a["lr"], a["tokens"], a["exposures"]) == (b["lr"], b["tokens"], b["exposures"])
        # the same checkpoints (steps, state fields) and config.json
        assert [f.name for f in checkpoint.step_folders(p)] == [f.name for f in checkpoint.step_folders(s)]
        sp, ss = (checkpoint.read_state(checkpoint.latest(d)) for d in (p, s))
        assert sorted(sp) == sorted(ss) and sp["fingerprint"] == ss["fingerprint"]
        assert sp["streams"] == ss["streams"] and sp["optimizer"]["param_groups"] == ss["optimizer"]["param_groups"]
        assert json.loads((p / "config.json").read_text()) == json.loads((s / "config.json").read_text())
        assert (p / "training.png").is_file()


def test_compile_option_trains_the_pack_compiled(packed, tmp_path, monkeypatch):
    """compile = true: the pack's forward and backward go through torch.compile, traced once
    (every step has the pack's padded shapes). Traced here with AOTAutograd onto eager
    kernels (inductor's numerics are tested in test_stacked.py at a fraction of the cost),
    so the weights equal the eager pack's within its drift bound."""
    from kcap.pack import StackedModels

    real, compiled = torch.compile, []

    def traced(module, **options):
        compiled.append(module)
        return real(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", traced)
    dirs = [tmp_path / f"run{i}" for i in range(len(CFGS))]
    reports = train_pack([replace(c, compile=True) for c in CFGS], dirs, progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0], StackedModels)
    for i, (d, ref, report, ref_report) in enumerate(zip(dirs, *packed, reports)):
        assert report["steps"] == ref_report["steps"]
        div, bound = weight_divergence(d, ref), DRIFT * LR_MAX * report["steps"]
        print(f"run {i}: compiled vs eager pack {div:.3g} = {div / bound:.3f} of the bound")
        assert div <= bound
        assert json.loads((d / "config.json").read_text())["config"]["compile"] is True


def test_stopped_pack_resumes_bit_for_bit_and_continues_solo(packed, tmp_path, monkeypatch, capfd):
    dirs = [tmp_path / f"run{i}" for i in range(len(CFGS))]
    stop_at(monkeypatch, pt, STOP_AT)
    with pytest.raises(Stop):
        train_pack(CFGS, dirs, progress=False)
    monkeypatch.undo()
    resumed_from = [checkpoint.step_of(checkpoint.latest(d)) for d in dirs]
    assert resumed_from == [15, 16, 15]  # the runs resume at different steps
    shutil.copytree(dirs[1], tmp_path / "solo1")
    train_pack(CFGS, dirs, progress=False)  # resume=True by default
    for i, (d, straight) in enumerate(zip(dirs, packed[0])):
        assert (checkpoint.latest(d) / "model.safetensors").read_bytes() == \
            (checkpoint.latest(straight) / "model.safetensors").read_bytes(), i
        rp, rs = (json.loads((x / "report.json").read_text()) for x in (d, straight))
        assert rp["bits_learned"] == rs["bits_learned"] and rp["param_checksums"] == rs["param_checksums"]
        strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
        assert strip(read_log(d)) == strip(read_log(straight))
    # a run stopped in a pack goes on solo from its checkpoint (step 16), not from 0
    capfd.readouterr()
    report = train(CFGS[1], tmp_path / "solo1", resume=True, progress=False)
    assert "(step 16 of 38)" in capfd.readouterr().err
    assert report["steps"] == 38
    assert weight_divergence(tmp_path / "solo1", packed[0][1]) <= DRIFT * LR_MAX * 38
    steps = [r["step"] for r in records(tmp_path / "solo1", "loss")]
    assert steps == [r["step"] for r in records(packed[0][1], "loss")]  # each step logged once


def test_finished_pack_run_is_not_retrained_solo(packed, tmp_path):
    run = tmp_path / "done"
    shutil.copytree(packed[0][2], run)
    weights = (checkpoint.latest(run) / "model.safetensors").read_bytes()
    losses = records(run, "loss")
    report = train(CFGS[2], run, resume=True, progress=False)
    assert report["steps"] == 20 and checkpoint.latest(run).name == "step-00000020"
    assert (checkpoint.latest(run) / "model.safetensors").read_bytes() == weights
    assert records(run, "loss") == losses
    assert report["bits_learned"] == json.loads((packed[0][2] / "report.json").read_text())["bits_learned"]


def test_solo_run_continues_in_a_pack(solo, tmp_path, monkeypatch):
    stop_at(monkeypatch, kt, 12)
    with pytest.raises(Stop):
        train(CFGS[0], tmp_path / "run0", progress=False)
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path / "run0").name == "step-00000010"
    reports = train_pack([CFGS[0], CFGS[2]], [tmp_path / "run0", tmp_path / "run2"], progress=False)
    assert [r["steps"] for r in reports] == [29, 20]
    for d, ref, t in ((tmp_path / "run0", solo[0][0], 29), (tmp_path / "run2", solo[0][2], 20)):
        assert weight_divergence(d, ref) <= DRIFT * LR_MAX * t
    assert [r["step"] for r in records(tmp_path / "run0", "loss")] == \
        [r["step"] for r in records(solo[0][0], "loss")]


def test_refusals(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    cases = [([BASE, replace(BASE, model="gpt2-1-2")], dirs, "must share model: config 1 has 'gpt2-1-2'"),
             ([BASE, replace(BASE, window=64)], dirs, "must share window"),
             ([BASE, replace(BASE, model_options={"tied": True})], dirs, "must share model_options"),
             ([replace(BASE, model="gpt2moe-1-2")] * 2, dirs, "MoE models cannot be packed"),
             ([BASE, BASE], [tmp_path / "a", tmp_path / "x" / ".." / "a"], "given twice"),
             ([BASE, BASE], dirs[:1], "one run folder per config: 2 configs, 1 run folders"),
             ([], [], "non-empty list"),
             ([BASE, "cfg"], dirs, "config 1 is a str")]
    for cfgs, run_dirs, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            train_pack(cfgs, run_dirs, progress=False)
        assert "\n" not in str(e.value)
    assert not any(p.exists() for p in dirs)  # refused before anything was written
    with run_lock(tmp_path / "b", "test"):  # every folder's lock is taken
        with pytest.raises(RunFolderBusy):
            train_pack([BASE, BASE], dirs, progress=False)


def test_a_nan_loss_in_one_run_stops_the_pack_before_any_checkpoint_holds_it(tmp_path, monkeypatch):
    """The loss is not read every step (no host sync): a non-finite loss is recorded on the
    device and raised at the next log, evaluation or checkpoint, naming the run and the
    step, before that run's next checkpoint is written."""
    real = pt.learning_rate
    bad_lr = CFGS[1].lr

    def lr(step, steps, peak, *args):
        # a finite lr (StackedAdamW refuses others) that blows the weights up at step 7
        return 1e30 if peak == bad_lr and step == 7 else real(step, steps, peak, *args)
    monkeypatch.setattr(pt, "learning_rate", lr)
    dirs = [tmp_path / f"run{i}" for i in range(len(CFGS))]
    with pytest.raises(kt.TrainingDiverged, match=r"run1: loss is (nan|inf) at step 8 \(in a pack\)"):
        train_pack(CFGS, dirs, progress=False)
    assert checkpoint.latest(dirs[1]).name == "step-00000008"  # saved at 8, before step 8 ran
    assert torch.isfinite(torch.stack([t.float().sum() for t in final_weights(dirs[1]).values()])).all()
