"""The results table of a sweep: one row per run (results.jsonl), built from the files the
runs wrote. Figures and results.md are drawn from these rows only.

A row: experiment, preset, run, status (done | failed | running | interrupted | pending),
labels, config, and for a done run: bits, bits_max, R, R_max, R_ci95, params (counted),
tokens, steps, train_s (seconds of training, evaluations excluded, over every attempt),
wall_s (seconds of the attempt that finished the run, evaluations and post-steps
included), device, literal_R (bioS:
Definition 4.3 read literally, see kcap/capacity.py), post ({step: {bits, R, R_ci95,
stored_bits}}); for a failed run: error and attempts.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from kcap.atomic import write_text
from kcap.experiments.job import config_record

NUMBERS = ("bits", "bits_max", "R", "R_max", "R_ci95", "params", "tokens", "steps", "train_s",
           "wall_s", "device", "literal_R")


def row_from_report(job, report: dict, post: dict) -> dict:
    """The done row of ``job`` from its run's report.json and its post-step results."""
    from kcap import run_log

    metric = report["metric"]
    records = run_log.read_log(job.run_dir, quiet=True)
    train_s, last = 0.0, 0
    for rec in records:  # seconds of training from the logged throughput, evaluations excluded
        if "tokens_per_s" in rec and rec["tokens_per_s"] > 0:
            train_s += (rec["tokens"] - last) / rec["tokens_per_s"]
            last = rec["tokens"]
    return {**_base(job, "done"),
            "bits": report["bits_learned"], "bits_max": report["bits_in_data"],
            "R": report["capacity_ratio"], "R_max": report["capacity_ratio_max"],
            "R_ci95": report["capacity_ratio_ci95"], "params": report["params_counted"],
            "tokens": report["tokens"], "steps": report["steps"], "train_s": train_s,
            "device": report["device"],
            "literal_R": (metric.get("literal") or {}).get("R"), "post": post,
            "error": None, "attempts": None}


def _base(job, status: str) -> dict:
    return {"experiment": job.experiment, "preset": job.preset, "run": job.name,
            "status": status, "labels": dict(job.run.labels),
            "config": config_record(job.run.config)}


def run_state(job, done: bool | None = None) -> str:
    """done | failed | running | interrupted (checkpoints, no result) | pending.
    ``done``: whether ``job.result()`` is there, when the caller has read it already."""
    from kcap import checkpoint

    if job.result() is not None if done is None else done:
        return "done"
    if _writer_alive(job.run_dir):
        return "running"
    if (job.folder / "failed.json").exists():
        return "failed"
    if checkpoint.step_folders(job.run_dir) if job.run_dir.is_dir() else False:
        return "interrupted"
    return "pending"


def _writer_alive(folder: Path) -> bool:
    """Whether the lock file names a live process of this host (read only: probing the lock
    itself could make a starting trainer fail)."""
    from kcap.run_lock import holder

    who = holder(folder) if folder.is_dir() else None
    if not who or who.get("host") != socket.gethostname():
        return bool(who)  # another host's holder: trust the file
    try:
        os.kill(int(who["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def row(job) -> dict:
    """The row of ``job`` as its files say now."""
    result = job.result()
    if result is not None:
        return result
    state = run_state(job, done=False)
    out = {**_base(job, state), **{k: None for k in NUMBERS}, "post": {}, "error": None,
           "attempts": None}
    if state == "failed":
        try:
            failed = json.loads((job.folder / "failed.json").read_text())
            out["error"], out["attempts"] = failed.get("error"), failed.get("attempts")
        except (OSError, ValueError):
            out["error"] = "failed (failed.json unreadable)"
    return out


def write_results(sweep, rows: list[dict]) -> Path:
    path = Path(sweep) / "results.jsonl"
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def read_results(sweep) -> list[dict]:
    """The rows of results.jsonl; ValueError naming the line if one is damaged."""
    path = Path(sweep) / "results.jsonl"
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{i}: not a JSON row") from None
    return rows
