"""What `kcap experiment list` and `kcap experiment status` print: every experiment with its
grid size and cost per preset; a sweep folder's runs by state with an ETA."""
from __future__ import annotations

import json
from pathlib import Path

from kcap.experiments import registry
from kcap.experiments.grids import estimate_seconds, run_facts
from kcap.experiments.results import run_state
from kcap.experiments.runner import last_record
from kcap.experiments.sweep import load_sweep
from kcap.run_plan import duration, human

# Where each preset's estimate is taken (grids.py holds the measured throughput model).
DEVICE = {"smoke": "cpu", "gpu": "h100", "paper": "h100"}


def cost(key: str, preset: str) -> dict:
    """runs, tokens and estimated seconds of an experiment's grid at a preset."""
    runs = registry.get(key).grid(preset)
    return {"runs": len(runs), "tokens": sum(run_facts(r)["tokens"] for r in runs),
            "seconds": sum(estimate_seconds(r, DEVICE[preset]) for r in runs)}


def list_text(presets=("smoke", "gpu", "paper")) -> str:
    lines = []
    for key, e in registry.EXPERIMENTS.items():
        lines += [f"{key:4} {e.title}", f"     paper: {e.claim}", f"     varies: {e.varies}"]
        for p in presets:
            c = cost(key, p)
            where = "2-core CPU" if DEVICE[p] == "cpu" else "one H100, solo runs"
            lines.append(f"     {p:5}  {c['runs']:3} runs, {human(c['tokens']):>6} tokens, "
                         f"~{duration(c['seconds'])} on {where}")
    lines += ["", "Estimates: tokens from ~61 per biography; time from measured throughput "
              "(kcap/experiments/grids.py). On a GPU most of these runs are bound by per-step "
              "overhead; packs of models per GPU are the way to fill it."]
    return "\n".join(lines)


def status_text(out) -> str:
    key, preset, jobs = load_sweep(out)
    by_state, lines, remaining, rate, left = {}, [], 0.0, 0.0, []
    for j in jobs:
        state = run_state(j)
        by_state.setdefault(state, []).append(j.name)
        if state == "done":
            continue
        left.append(j)
        total = run_facts(j.run)["tokens"]
        last = last_record(j.run_dir)
        done = last.get("tokens", 0) if last else 0
        remaining += max(0, total - done)
        detail = ""
        if last:
            detail = f"step {last['step']:,}, {human(done)} of ~{human(total)} tokens"
            if state == "running":
                rate += last.get("tokens_per_s", 0)
                detail += f", {human(last.get('tokens_per_s', 0))} tokens/s"
        if state == "failed":
            try:
                detail = json.loads((j.folder / "failed.json").read_text()).get("error", "")
            except (OSError, ValueError):
                detail = "failed.json unreadable"
        lines.append(f"  {state:11} {j.name}  {detail}")
    head = [f"{key} ({preset}) in {Path(out)}: " + ", ".join(
        f"{len(v)} {k}" for k, v in sorted(by_state.items())) + f" of {len(jobs)} runs"]
    if rate:
        head.append(f"  in flight: {human(rate)} tokens/s; ETA {duration(remaining / rate)} "
                    f"for ~{human(remaining)} tokens left")
    elif remaining:
        seconds = sum(estimate_seconds(j.run, DEVICE[preset]) for j in left)
        head.append(f"  nothing running; ~{human(remaining)} tokens left, ~{duration(seconds)} "
                    f"({DEVICE[preset]} estimate); continue with `kcap experiment run {key} "
                    f"--preset {preset} --out {out}`")
    return "\n".join(head + lines)
