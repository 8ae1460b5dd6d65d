"""A sweep folder: one experiment's grid at one preset, recorded in sweep.json when it starts.

Running the same command again continues the same sweep; a folder that holds another
experiment, preset or a grid that has since changed is refused, so that results of two
grids never mix in one table.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

from kcap.atomic import write_json
from kcap.experiments import registry
from kcap.experiments.job import RunJob
from kcap.experiments.spec import PostStep

SWEEP_FILE = "sweep.json"


# What --qa adds to every run: the QA extraction test, shortened on the smoke preset
QA_OPTIONS = {"smoke": {"epochs": 2}}


def _record(key: str, preset: str, runs, qa: bool, bior: str | None) -> dict:
    return {"experiment": key, "preset": preset, "qa": qa, "bior": bior,
            "runs": json.loads(json.dumps(
                [{"name": r.name, "labels": r.labels, "config": asdict(r.config),
                  "post": [asdict(p) for p in r.post]} for r in runs]))}


def open_sweep(out, key: str, preset: str, qa: bool = False, bior=None) -> list[RunJob]:
    """The jobs of experiment ``key`` at ``preset`` in folder ``out``, recording the grid in
    a new folder; ValueError if ``out`` holds something else. ``qa``: every run also gets
    the QA extraction test as a post-step (``kcap experiment run KEY --qa``). ``bior``: a
    bioR import (``kcap data import-bior``) whose runs join r2's grid."""
    experiment = registry.get(key)
    runs = experiment.grid(preset)
    if bior is not None:
        if key not in registry.BIOR_EXPERIMENTS:
            raise ValueError(f"--bior adds bioR runs to {', '.join(registry.BIOR_EXPERIMENTS)} "
                             f"only, not {key}")
        runs = runs + registry.bior_grid(preset, bior)
        bior = str(Path(bior).resolve())
    if qa:
        step = PostStep("qa", "qa", QA_OPTIONS.get(preset, {}))
        runs = [dataclasses.replace(r, post=r.post + (step,)) for r in runs]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; --out must be a folder")
    record = _record(key, preset, runs, qa, bior)
    path = out / SWEEP_FILE
    if path.exists():
        old = _read(path)
        if (old.get("experiment"), old.get("preset")) != (key, preset):
            raise ValueError(f"{out} holds the sweep {old.get('experiment')} ({old.get('preset')} "
                             f"preset), not {key} ({preset}); choose another --out")
        if old.get("bior") != bior:
            raise ValueError(f"{out} was started " + (f"with --bior {old['bior']}" if old.get("bior")
                             else "without --bior") + "; continue it the same way, or choose "
                             "another --out")
        if bool(old.get("qa")) != qa:
            raise ValueError(f"{out} was started {'with' if old.get('qa') else 'without'} --qa; "
                             f"continue it the same way, or choose another --out")
        if old.get("runs") != record["runs"]:
            changed = sorted({r["name"] for r in record["runs"]} ^ {r["name"] for r in old["runs"]}
                             | {a["name"] for a, b in zip(record["runs"], old["runs"]) if a != b})
            raise ValueError(f"the {key} ({preset}) grid changed since {out} was started (runs "
                             f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}); "
                             "continue it with the kcap that started it, or choose another --out")
    else:
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty and holds no sweep; choose another --out")
        write_json(path, record)
    return [RunJob(r, out, key, preset) for r in runs]


def load_sweep(out) -> tuple[str, str, list[RunJob]]:
    """(experiment key, preset, jobs) of an existing sweep folder."""
    out = Path(out)
    path = out / SWEEP_FILE
    if not path.exists():
        raise ValueError(f"{out} holds no sweep ({SWEEP_FILE} missing); start one with "
                         "`kcap experiment run KEY --out FOLDER`")
    old = _read(path)
    key, preset = old.get("experiment"), old.get("preset")
    return key, preset, open_sweep(out, key, preset, bool(old.get("qa")), old.get("bior"))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ValueError(f"{path} is damaged (not JSON)") from None
