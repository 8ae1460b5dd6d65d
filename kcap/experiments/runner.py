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
from kcap.experiments.results import row, write_results
from kcap.experiments.sweep import open_sweep
from kcap.run_lock import run_lock
from kcap.run_plan import duration, human


def run_sweep(key: str, preset: str, out, executor=None, retries: int = 1,
              progress: bool = True) -> list[dict]:
    """Run experiment ``key`` at ``preset`` in folder ``out``; return the results rows."""
    from kcap.experiments.executors import LocalExecutor

    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    out = Path(out)
    jobs = open_sweep(out, key, preset)
    with run_lock(out, f"experiment {key}"):
        todo = [j for j in jobs if j.result() is None]
        if todo:
            note(f"{key} ({preset}): {len(jobs) - len(todo)} of {len(jobs)} runs done; "
                 f"running {len(todo)} in {out}")
            own = executor is None
            executor = executor or LocalExecutor()
            try:
                _drive(executor, jobs, todo, retries, progress)
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


def _drive(executor, jobs, todo, retries: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    attempts = {j.name: 1 for j in todo}
    tokens = {j.name: run_facts(j.run)["tokens"] for j in todo}
    for j in todo:
        (j.folder).mkdir(parents=True, exist_ok=True)
    executor.start(todo)
    left = {j.name for j in todo}
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="run", disable=not progress,
               dynamic_ncols=True, desc="sweep")
    try:
        while left:
            for o in executor.wait(2.0):
                name = o.job.name
                if o.ok:
                    left.discard(name)
                    bar.update(1)
                elif attempts[name] <= retries:
                    attempts[name] += 1
                    note(f"run {name} failed ({o.error}); retrying it")
                    executor.start([o.job])
                else:
                    left.discard(name)
                    bar.update(1)
                    write_json(o.job.folder / "failed.json",
                               {"error": o.error, "attempts": attempts[name]})
                    warn(f"run {name} failed {attempts[name]} times: {o.error}; the sweep goes on")
            bar.set_postfix_str(_pace([j for j in todo if j.name in left], tokens), refresh=True)
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
