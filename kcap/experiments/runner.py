"""Run (or continue) a sweep: every run of the grid not yet done goes to an executor; a
failed run is retried once, then reported, and the sweep goes on; at the end the results
table, figures and results.md are written.

Idempotent: finished runs are skipped, interrupted ones resume from their checkpoints
(RunJob reads what is on disk), so killing the sweep at any moment and running the same
command again completes it. While it runs, one progress bar covers the sweep: runs done of
the total, tokens/s of the runs in flight and an ETA from the grid's remaining tokens.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from kcap.atomic import write_json
from kcap.console import note, warn
from kcap.experiments.grids import run_facts
from kcap.experiments.packing import PackJob, members, plan_units
from kcap.experiments.results import row, write_results
from kcap.experiments.sweep import open_sweep
from kcap.run_lock import run_lock
from kcap.run_plan import duration, human


def run_sweep(key: str, preset: str, out, executor=None, retries: int = 1,
              progress: bool = True, pack: str = "auto", qa: bool = False,
              bior=None) -> list[dict]:
    """Run experiment ``key`` at ``preset`` in folder ``out``; return the results rows.

    ``pack``: "auto" trains compatible runs as packs (kcap/experiments/packing.py) when the
    executor's slots are GPUs, "on" always (also on a CPU, where it is slower), "off" never.
    ``qa``: every run also gets the QA extraction test (kcap.qa) as a post-step; ``bior``:
    a bioR import whose runs join r2's grid.
    """
    from kcap.experiments.executors import LocalExecutor

    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    out = Path(out)
    jobs = open_sweep(out, key, preset, qa, bior)
    with run_lock(out, f"experiment {key}"):
        todo = [j for j in jobs if j.result() is None]
        if todo:
            note(f"{key} ({preset}): {len(jobs) - len(todo)} of {len(jobs)} runs done; "
                 f"running {len(todo)} in {out}")
            own = executor is None
            executor = executor or LocalExecutor()
            on_gpu, memory = _gpu_slots(executor)
            units = plan_units(todo, pack, on_gpu, memory)
            packs = [u for u in units if isinstance(u, PackJob)]
            if packs:
                note(f"{sum(len(u.jobs) for u in packs)} runs train as {len(packs)} pack(s) of up "
                     f"to {max(len(u.jobs) for u in packs)} models (--pack off: one by one)")
            try:
                _drive(executor, len(jobs), units, retries, progress)
            finally:
                if own:
                    executor.close()
        rows = [row(j) for j in jobs]
        write_results(out, rows)
        from kcap.experiments.report import write_report
        write_report(out, rows)
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    if failed:
        warn(f"{len(failed)} run(s) failed on every attempt and are reported as failed: {', '.join(failed)} "
             f"(errors in {out}/jobs/<run>/failed.json)")
    return rows


def _gpu_slots(executor) -> tuple[bool, int | None]:
    """Whether the executor runs on GPUs, and the memory one of its slots may use."""
    slots = getattr(executor, "slots", None)
    if slots is None:  # Slurm: GPUs when the tasks ask for them
        return bool(getattr(executor, "gpus_per_node", None)), None
    gpus = [s for s in slots if s != "cpu"]
    if not gpus:
        return False, None
    import torch

    if not torch.cuda.is_available():
        return True, None
    total = torch.cuda.get_device_properties(0).total_memory
    return True, total // max(slots.count(g) for g in gpus)


def _drive(executor, total: int, units, retries: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    attempts = {u.name: 1 for u in units}
    tokens = {j.name: run_facts(j.run)["tokens"] for u in units for j in members(u)}
    for u in units:
        u.folder.mkdir(parents=True, exist_ok=True)
    executor.start(units)
    left = {u.name: u for u in units}
    todo = sum(len(members(u)) for u in units)
    bar = tqdm(total=total, initial=total - todo, unit="run", disable=not progress,
               dynamic_ncols=True, desc="sweep")
    try:
        while left:
            for o in executor.wait(2.0):
                unit, name = o.job, o.job.name
                if o.ok:
                    del left[name]
                    bar.update(len(members(unit)))
                elif attempts[name] <= retries:
                    attempts[name] += 1
                    note(f"{name} failed ({o.error}); retrying it")
                    executor.start([unit])
                elif isinstance(unit, PackJob):
                    # one bad run must not sink its pack-mates: they go on alone
                    del left[name]
                    solo = [j for j in unit.jobs if j.result() is None]
                    bar.update(len(unit.jobs) - len(solo))
                    warn(f"{name} failed {attempts[name]} times ({o.error}); its {len(solo)} "
                         "unfinished runs continue one by one")
                    for j in solo:
                        attempts[j.name] = 1
                        j.folder.mkdir(parents=True, exist_ok=True)
                        left[j.name] = j
                    executor.start(solo)
                else:
                    del left[name]
                    bar.update(1)
                    write_json(unit.folder / "failed.json",
                               {"error": o.error, "attempts": attempts[name]})
                    warn(f"run {name} failed {attempts[name]} times: {o.error}; the sweep goes on")
            in_flight = [j for u in left.values() for j in members(u)]
            bar.set_postfix_str(_pace(in_flight, tokens), refresh=True)
    except BaseException:
        bar.close()
        raise
    bar.close()


def _pace(left_jobs, tokens: dict) -> str:
    """'name 40%, name 12%; X tokens/s, ETA ...' from the logs of the runs in flight."""
    rate, remaining, running = 0.0, 0.0, []
    for j in left_jobs:
        last = last_record(j.run_dir)
        done = last.get("tokens", 0) if last else 0
        remaining += max(0.0, tokens[j.name] - done)
        if last and time.time() - (j.run_dir / "log.jsonl").stat().st_mtime < 120:
            rate += last.get("tokens_per_s", 0.0)
            running.append(f"{j.name} {min(1.0, done / max(tokens[j.name], 1)):.0%}")
    if not rate:
        return f"{len(left_jobs)} left"
    shown = ", ".join(running[:3]) + (f" +{len(running) - 3}" if len(running) > 3 else "")
    return f"{shown}; {human(rate)} tokens/s, ETA {duration(remaining / rate)}"


def last_record(run_dir: Path) -> dict | None:
    """The last training record of a run's log.jsonl (reads only its tail)."""
    path = Path(run_dir) / "log.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "tokens" in rec:
            return rec
    return None
