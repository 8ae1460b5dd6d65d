"""The trainer end to end on CPU: it learns, it resumes bit-identically after a real kill,
it refuses bad checkpoints and diverged runs, and DDP works on CPU with gloo."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kcap import checkpoint
from kcap.config_file import load_config
from kcap.train import DataConfig, TrainConfig, TrainingDiverged, read_log, train

TINY = TrainConfig(model="gpt2-1-1", data=DataConfig(n=60, variant="simple"), exposures=4,
                   window=128, batch_size=4, lr=3e-3, eval_sample=None, log_every=1,
                   checkpoint_every=5, warmup_steps=2)


def write_toml(path: Path, cfg_lines: str) -> Path:
    path.write_text(cfg_lines)
    return path


TOML = """
model = "gpt2-1-1"
exposures = 6
window = 128
batch_size = 4
lr = 3e-3
warmup_steps = 2
log_every = 1
checkpoint_every = 3
eval_sample = 20
[data]
kind = "bioS"
n = 60
variant = "simple"
"""


def test_tiny_model_learns_real_bits(tmp_path):
    cfg = replace(TINY, data=DataConfig(n=100, variant="simple"), exposures=80, window=128,
                  batch_size=8, log_every=50, checkpoint_every=0, warmup_steps=None)
    report = train(cfg, tmp_path / "learn", progress=False)
    # ~480 steps (measured: ~79% of the 6,820 bits, majors ~92% right, in ~14 s on 2 cores).
    # Guessing the pools gives 0 value bits and 1% on majors; the bound is R_max.
    assert report["steps"] > 400
    assert report["bits_learned"] > 0.4 * report["bits_in_data"]
    assert report["capacity_ratio"] < report["capacity_ratio_max"]
    accuracy = report["metric"]["attribute_accuracy"]
    assert accuracy["major"]["value"] > 0.3
    # Every planned step ran (the last batch is partial) and the final weights were saved:
    # evaluating the saved checkpoint reproduces the report.
    assert report["steps"] == report["planned_steps"]
    assert checkpoint.latest(tmp_path / "learn").name == f"step-{report['steps']:08d}"
    from kcap.evaluate_checkpoint import evaluate_checkpoint
    again, _ = evaluate_checkpoint(tmp_path / "learn", device="cpu")
    assert again.bits == pytest.approx(report["bits_learned"], rel=1e-12)


def test_resume_after_kill_is_bit_identical(tmp_path):
    config = write_toml(tmp_path / "run.toml", TOML)
    cmd = [sys.executable, "-m", "kcap", "train", str(config), "--no-progress", "--out"]
    straight = tmp_path / "straight"
    subprocess.run(cmd + [str(straight)], check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "latest").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint before the run ended"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = checkpoint.latest(killed).name
    steps = json.loads((straight / "report.json").read_text())["steps"]
    assert first != f"step-{steps:08d}", "the kill came too late to test anything"
    subprocess.run(cmd + [str(killed), "--resume"], check=True, capture_output=True)
    a = (checkpoint.latest(straight) / "model.safetensors").read_bytes()
    b = (checkpoint.latest(killed) / "model.safetensors").read_bytes()
    assert a == b
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (straight, killed))
    assert ra["bits_learned"] == rb["bits_learned"]
    assert [r["loss"] for r in read_log(straight) if "loss" in r] == \
        [r["loss"] for r in read_log(killed) if "loss" in r]


def test_refuses_foreign_corrupt_and_overwrite(tmp_path):
    run = tmp_path / "run"
    train(replace(TINY, steps=5), run, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(replace(TINY, steps=5), run, progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="another configuration.*lr"):
        train(replace(TINY, steps=5, lr=1e-2), run, resume=True, progress=False)
    weights = checkpoint.latest(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        train(replace(TINY, steps=5), run, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import kcap.train as kt
    real = kt.learning_rate
    monkeypatch.setattr(kt, "learning_rate", lambda s, *a: float("nan") if s >= 7 else real(s, *a))
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="loss is nan at step 8.*step-00000005"):
        train(replace(TINY, steps=20), run, progress=False)
    assert checkpoint.latest(run).name == "step-00000005"
    checkpoint.read_state(checkpoint.latest(run))  # intact


@pytest.mark.parametrize("name", ["gpt2-1-2", "gpt2quarter-1-2", "gpt2nomlp-1-2", "gpt2moe-1-2",
                                  "llama-1-2", "llamaplain-1-2", "mistral-1-4"])
def test_every_architecture_trains_and_reports(tmp_path, name):
    report = train(replace(TINY, model=name, steps=3, eval_sample=10), tmp_path / name, progress=False)
    assert report["steps"] == 3 and report["params_counted"] <= report["params_total"]
    if name.startswith("gpt2moe"):
        assert report["params_active"] < report["params_total"]


def test_config_file_and_cli(tmp_path):
    cfg = load_config(write_toml(tmp_path / "a.toml", TOML))
    assert cfg.data.n == 60 and cfg.checkpoint_every == 3
    bad = write_toml(tmp_path / "b.toml", TOML.replace("lr = 3e-3", "learning_rate = 3e-3"))
    with pytest.raises(ValueError, match="unknown keys .*learning_rate"):
        load_config(bad)
    out = subprocess.run([sys.executable, "-m", "kcap", "train", str(bad), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "learning_rate" in out.stderr
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "kcap", "train", str(tmp_path / "a.toml"), "--out", str(run),
                    "--no-progress"], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "kcap", "eval", str(run), "--json", str(tmp_path / "e.json")],
                         capture_output=True, text=True, check=True)
    assert "bits" in out.stdout and json.loads((tmp_path / "e.json").read_text())["n_people"] == 60


def test_ddp_on_cpu_with_two_processes(tmp_path):
    config = write_toml(tmp_path / "run.toml", TOML.replace("batch_size = 4", "batch_size = 4\nsteps = 6"))
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "kcap", "train", str(config), "--out", str(run), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((run / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 6
    a, b = report["param_checksums"]
    assert a == b  # DDP kept the replicas in sync
    streams = json.loads((checkpoint.latest(run) / "state.json").read_text())["streams"]
    assert [s["fingerprint"]["rank"] for s in streams] == [0, 1]
    assert streams[0]["cursor"] > 0 and streams[1]["cursor"] > 0


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[2].glob("configs/*.toml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model and cfg.data.n >= 1


def test_the_1000_exposure_config_can_show_the_2_bit_law():
    """Its data must hold well over 2 bits per counted parameter: R <= R_max, so a config
    with R_max below 2 could never show the paper's law (the first version had R_max 0.30)."""
    from kcap.capacity import data_bits_max
    from kcap.models import build_model, parameter_report
    from kcap.train import build_data

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "bios-gpt2-1000x.toml")
    ds, _, _ = build_data(cfg)
    model = build_model(cfg.model, ds.tokenizer.vocab_size, context=cfg.window, **cfg.model_options)
    r_max = data_bits_max(ds) / parameter_report(model, ds.used_token_ids())["counted"]
    assert cfg.exposures == 1000 and r_max > 3


def test_ddp_step_check_reduces_on_the_host_under_nccl(monkeypatch):
    """Under NCCL (faked here: no GPUs), init() makes a gloo group and all_min reduces a
    host tensor in it, so the per-step check never waits for the GPU's queue."""
    import torch.distributed as td

    from kcap import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(td, "is_initialized", lambda: True)
    monkeypatch.setattr(td, "get_backend", lambda *group: "nccl")
    monkeypatch.setattr(td, "new_group", lambda backend: calls.append(("new_group", backend)) or "gloo-group")

    def all_reduce(t, op, group=None):
        calls.append(("all_reduce", t.device.type, group))
        t.fill_(3)
    monkeypatch.setattr(td, "all_reduce", all_reduce)
    dist = distributed.init()
    assert (dist.rank, dist.world, dist.host_group) == (1, 2, "gloo-group")
    assert dist.all_min(5) == 3
    assert calls == [("new_group", "gloo"), ("all_reduce", "cpu", "gloo-group")]
