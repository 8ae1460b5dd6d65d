"""Run folders that sweeps can trust: one writer at a time, checkpoints verified by a
manifest with a fallback to the newest intact one, a log that survives torn appends and
kills, quantized models kept out of run folders, and what a run says about itself."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from kcap import checkpoint, run_log
from kcap.run_lock import LOCK_NAME, RunFolderBusy, run_lock
from kcap.train import DataConfig, TrainConfig, read_log, train
from stop_training import Stop, stop_at

TINY = TrainConfig(model="gpt2-1-1", data=DataConfig(n=60, variant="simple"), exposures=4,
                   window=128, batch_size=4, lr=3e-3, eval_sample=None, log_every=1,
                   checkpoint_every=5, warmup_steps=2, keep_checkpoints=3)
CFG = replace(TINY, steps=12)


def run_until(monkeypatch, run, after: int, cfg=CFG, **kwargs):
    """Start ``cfg`` in ``run`` and stop it once step ``after`` is done."""
    import kcap.train as kt

    real = stop_at(monkeypatch, kt, after)
    with pytest.raises(Stop):
        train(cfg, run, progress=False, **kwargs)
    monkeypatch.setattr(kt, "learning_rate", real)


def weights(run) -> bytes:
    return (checkpoint.latest(run) / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """CFG trained without interruption (the reference every resumed run must match)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(CFG, run, progress=False)
    return run


def losses(run):
    return [(r["step"], r["loss"]) for r in read_log(run) if "loss" in r]


# --- one writer per folder ------------------------------------------------------------------

def test_a_second_writer_is_refused_in_process(tmp_path):
    with run_lock(tmp_path / "run", "test"):
        with pytest.raises(RunFolderBusy, match=r"in use by another kcap process \(test, pid"):
            train(CFG, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_two_kcap_train_on_one_folder(tmp_path, capfd):
    config = tmp_path / "long.toml"
    config.write_text('model = "gpt2-1-1"\nexposures = 400\nwindow = 128\nbatch_size = 4\n'
                      'checkpoint_every = 5\n[data]\nn = 60\nvariant = "simple"\n')
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kcap", "train", str(config), "--out", str(run), "--no-progress"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints").is_dir():
            assert time.time() < deadline and first.poll() is None, "the first run did not start"
            time.sleep(0.05)
        second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert "in use by another kcap process (train, pid" in second.stderr
        assert str(first.pid) in second.stderr and "Traceback" not in second.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # the killed holder's lock is stale: the next writer takes it over and says whose it was
    capfd.readouterr()
    with run_lock(run, "check"):
        pass
    assert f"taking over the lock of a train process that stopped without releasing it (pid " \
           f"{first.pid}" in capfd.readouterr().err


def test_stale_lock_file_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "purpose": "train"}))
    train(replace(CFG, steps=2), run, progress=False)
    assert "taking over the lock of a train process" in capsys.readouterr().err
    assert (run / LOCK_NAME).read_text() == ""  # released cleanly


# --- checkpoints: manifest, fallback, leftovers -------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "flip", "remove_weights", "edit_state", "remove_manifest"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, monkeypatch, capsys, damage, straight):
    run = tmp_path / "run"
    run_until(monkeypatch, run, after=11)  # checkpoints at steps 5 and 10
    newest = checkpoint.step_folders(run)[0]
    assert newest.name == "step-00000010"
    if damage == "truncate":
        f = newest / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:-8])
    elif damage == "flip":
        f = newest / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "remove_weights":
        (newest / "model.safetensors").unlink()
    elif damage == "edit_state":  # a hand edit of the step or the data cursor
        state = json.loads((newest / "state.json").read_text())
        state["streams"][0]["cursor"] += 1
        (newest / "state.json").write_text(json.dumps(state, indent=1))
    else:
        (newest / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.verify(newest)
    capsys.readouterr()
    train(CFG, run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "step-00000010" in err and "resuming from an older checkpoint" in err
    assert "from checkpoints/step-00000005 (step 5 of 12)" in err
    assert (run / "checkpoints" / "corrupt-step-00000010").is_dir()  # kept for inspection
    assert weights(run) == weights(straight)
    assert losses(run) == losses(straight)


def test_lost_latest_pointer_resumes_from_the_newest_checkpoint(tmp_path, monkeypatch, capsys, straight):
    run = tmp_path / "run"
    run_until(monkeypatch, run, after=11)
    (run / "checkpoints" / "latest").unlink()  # or a kill between the rename and this write
    capsys.readouterr()
    train(CFG, run, resume=True, progress=False)
    assert "from checkpoints/step-00000010 (step 10 of 12)" in capsys.readouterr().err
    assert weights(run) == weights(straight) and losses(run) == losses(straight)


def test_all_checkpoints_corrupt_is_an_error_not_a_restart(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_until(monkeypatch, run, after=7)
    (checkpoint.step_folders(run)[0] / "manifest.json").unlink()
    for _ in range(2):  # and it stays an error: nothing was set aside
        with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint.*no manifest.json"):
            train(CFG, run, resume=True, progress=False)
    assert [p.name for p in checkpoint.step_folders(run)] == ["step-00000005"]


def test_leftover_partial_checkpoint_folders_are_removed(tmp_path, monkeypatch, capsys, straight):
    run = tmp_path / "run"
    run_until(monkeypatch, run, after=7)
    partial = run / "checkpoints" / ".step-00000010.abc123"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    train(CFG, run, resume=True, progress=False)
    assert not partial.exists() and ".step-00000010.abc123" in capsys.readouterr().err
    assert weights(run) == weights(straight)


# --- the log ----------------------------------------------------------------------------------

def test_torn_and_garbage_log_lines_never_block_resume(tmp_path, monkeypatch, capsys, straight):
    run = tmp_path / "run"
    run_until(monkeypatch, run, after=7)
    log = run / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    # a garbage line and a record without a step in the middle, a torn line at the end
    log.write_text("".join(lines[:2]) + "#$%garbage\n" + '{"note": "no step"}\n' + "".join(lines[2:])
                   + '{"step": 8, "loss": 2.5, "lr"')
    capsys.readouterr()
    records = read_log(run)
    assert "dropped a torn last line" in capsys.readouterr().err
    assert len(records) == len(lines) + 1
    train(CFG, run, resume=True, progress=False)
    assert losses(run) == losses(straight)
    assert all(isinstance(r.get("step"), int) for r in read_log(run, quiet=True))


def test_append_after_a_torn_line_starts_a_fresh_line(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    run_log.append_record(tmp_path, {"step": 3})
    assert [r["step"] for r in read_log(tmp_path, quiet=True)] == [1, 3]


@pytest.mark.parametrize("where", ["before_first_checkpoint", "before_first_latest_write"])
def test_no_duplicate_log_records_after_an_early_kill(tmp_path, monkeypatch, straight, where):
    run = tmp_path / "run"
    if where == "before_first_checkpoint":
        run_until(monkeypatch, run, after=4)  # steps 1-4 logged, no checkpoint yet
        assert not checkpoint.step_folders(run) and len(losses(run)) == 4
    else:
        run_until(monkeypatch, run, after=6)
        (run / "checkpoints" / "latest").unlink()
    train(CFG, run, resume=True, progress=False)
    assert losses(run) == losses(straight)  # each step exactly once


# --- CPU threads ------------------------------------------------------------------------------

def test_resume_at_another_thread_count_is_bit_identical(tmp_path, monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        reference = tmp_path / "reference"
        train(CFG, reference, progress=False)
        run = tmp_path / "run"
        run_until(monkeypatch, run, after=7)
        torch.set_num_threads(1)
        capsys.readouterr()
        train(CFG, run, resume=True, progress=False)
        assert "resuming with 2 CPU thread(s) as the run was trained (not 1)" in capsys.readouterr().err
        assert torch.get_num_threads() == 1  # the caller's setting comes back
        assert weights(run) == weights(reference)
    finally:
        torch.set_num_threads(before)


# --- what a run says, and what it leaves ------------------------------------------------------

def test_a_run_states_its_plan_and_pace_and_draws_its_figure(tmp_path, monkeypatch, capsys):
    from kcap import run_plan

    monkeypatch.setattr(run_plan, "INFEASIBLE_HOURS", 1e-9)
    report = train(replace(TINY, steps=20), tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert f"{report['params_counted']:,} parameters counted" in err
    assert f"R_max = {report['capacity_ratio_max']:.3f} bits/param; below the paper's ~2" in err
    assert "plan: 20 steps x 4 windows x 128 tokens" in err
    assert "kcap: warning: pace" in err and "more than 1e-09 hours: use a faster device" in err
    png = tmp_path / "run" / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_negative_bits_are_explained_where_printed(tmp_path, capsys):
    train(replace(TINY, steps=2, eval_every=1, lr=1e-6), tmp_path / "run", progress=True)
    out = capsys.readouterr()
    assert "bits, R = -" in out.err + out.out
    assert "negative: the model's losses are still above a uniform guess" in out.err + out.out


# --- quantized models stay out of run folders -------------------------------------------------

def test_quantize_refuses_outputs_inside_runs_and_checkpoints(tmp_path, straight):
    from kcap.cli import main

    ckpt = checkpoint.latest(straight)
    for out in (straight, straight / "q", ckpt, ckpt.parent / "step-00000099", straight / "checkpoints"):
        with pytest.raises(ValueError, match="lies inside the (run|checkpoint) folder"):
            from kcap.quantize_run import quantize_run
            quantize_run(straight, out, 8, "rtn")
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["quantize", str(straight), "--bits", "8", "--method", "rtn", "--out", str(other)]) == 2
    before = {p: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    assert {p: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before


def test_eval_refuses_a_folder_that_is_both_run_and_quantized(tmp_path, straight):
    import shutil

    from kcap.evaluate_checkpoint import evaluate_checkpoint

    mixed = tmp_path / "mixed"
    shutil.copytree(straight, mixed)
    (mixed / "quantized.json").write_text("{}")
    with pytest.raises(ValueError, match="both a training run and a quantized model"):
        evaluate_checkpoint(mixed, device="cpu")


def test_eval_writing_into_a_run_takes_its_lock(tmp_path, straight, capsys):
    from kcap.cli import main

    target = straight / "eval.json"
    with run_lock(straight, "train"):
        assert main(["eval", str(straight), "--sample", "10", "--json", str(target)]) == 2
    assert "in use by another kcap process (train" in capsys.readouterr().err
    assert not target.exists()
    assert main(["eval", str(straight), "--sample", "10", "--json", str(target)]) == 0
    assert json.loads(target.read_text())["n_evaluated"] == 10
