"""A sweep folder: one experiment's grid at one preset, recorded in sweep.json when it starts.

Running the same command again continues the same sweep; a folder that holds another
experiment, preset or a grid that has since changed is refused, so that results of two
grids never mix in one table.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kcap.atomic import write_json
from kcap.experiments import registry
from kcap.experiments.job import RunJob

SWEEP_FILE = "sweep.json"


def _record(key: str, preset: str, runs) -> dict:
    return {"experiment": key, "preset": preset,
            "runs": json.loads(json.dumps(
                [{"name": r.name, "labels": r.labels, "config": asdict(r.config),
                  "post": [asdict(p) for p in r.post]} for r in runs]))}


def open_sweep(out, key: str, preset: str) -> list[RunJob]:
    """The jobs of experiment ``key`` at ``preset`` in folder ``out``, recording the grid in
    a new folder; ValueError if ``out`` holds something else."""
    experiment = registry.get(key)
    runs = experiment.grid(preset)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; --out must be a folder")
    record = _record(key, preset, runs)
    path = out / SWEEP_FILE
    if path.exists():
        old = _read(path)
        if (old.get("experiment"), old.get("preset")) != (key, preset):
            raise ValueError(f"{out} holds the sweep {old.get('experiment')} ({old.get('preset')} "
                             f"preset), not {key} ({preset}); choose another --out")
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
    return key, preset, open_sweep(out, key, preset)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ValueError(f"{path} is damaged (not JSON)") from None
