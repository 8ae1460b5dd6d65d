"""results.md and the figures of a sweep, drawn from its results rows only.

results.md puts each measured quantity next to the paper's claim (e.g. "peak R 1.97 +- 0.02
| paper: >= 2 | 0.99x"), then the figure, then every run with its status.
"""
from __future__ import annotations

import datetime
from pathlib import Path

from kcap.atomic import write_text
from kcap.experiments import registry
from kcap.experiments.figures import draw_figure
from kcap.experiments.findings import extraction
from kcap.experiments.results import read_results
from kcap.run_plan import duration, human

PRESET_NOTES = {
    "smoke": "smoke preset: tiny models trained for seconds on a CPU. It exercises every moving "
             "part (grid, resume, post-steps, figure, table); its numbers say nothing about the "
             "paper's claims.",
    "gpu": "gpu preset: the paper's recipes at N = 10K-50K on one GPU.",
    "paper": "paper preset: the paper's grid and recipes.",
}


def write_report(out, rows: list[dict] | None = None) -> Path:
    """Draw the figure and write results.md of the sweep in ``out``; return its path."""
    out = Path(out)
    rows = read_results(out) if rows is None else rows
    if not rows:
        raise ValueError(f"{out}/results.jsonl holds no rows")
    key, preset = rows[0]["experiment"], rows[0]["preset"]
    experiment = registry.get(key)
    figures = draw_figure(experiment.figure, rows, out / "figures" / key,
                          f"{key}: {experiment.title} ({preset})", dict(experiment.figure_options))
    lines = [f"# {key}: {experiment.title}", "",
             f"- paper: {experiment.claim}", f"- grid: {experiment.varies}",
             f"- {PRESET_NOTES.get(preset, preset)}", f"- {_counts(rows)}; written "
             f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", ""]
    lines += ["| quantity | measured | paper | factor | note |", "|---|---|---|---|---|"]
    for f in experiment.findings(rows) + extraction(rows):
        measured = "-" if f.measured is None else (
            f"{f.measured:.3f}" + (f" +- {f.ci95:.3f}" if f.ci95 else ""))
        factor = "-" if f.factor is None else f"{f.factor:.2f}x"
        lines.append(f"| {f.quantity} | {measured} | {f.claim} | {factor} | {f.note} |")
    lines.append("")
    png = [p for p in figures if p.suffix == ".png"]
    lines += [f"![{key}]({p.relative_to(out).as_posix()})" for p in png] or [
        "(no figure: no run has finished yet)"]
    lines += ["", "## Runs", "",
              "| run | status | P counted | bits | R | R_max | tokens | training | device |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "done":
            lines.append(f"| {r['run']} | done | {r['params']:,} | {r['bits']:,.0f} | "
                         f"{r['R']:.3f}{_ci(r)} | {r['R_max']:.3f} | {human(r['tokens'])} | "
                         f"{duration(r['train_s'] or 0)} | {r['device']} |")
        else:
            lines.append(f"| {r['run']} | {r['status']} | | | | | | | "
                         f"{(r.get('error') or '').replace('|', '/')} |")
    if any(r.get("post") for r in rows):
        lines += ["", "## After post-steps", "",
                  "qa: bits and R are the extractable ones (kcap qa); exact match on held-out "
                  "people. Quantized steps: stored bits are the weights' storage.", "",
                  "| run | step | bits | R | stored bits | QA exact match |", "|---|---|---|---|---|---|"]
        for r in rows:
            for step, p in (r.get("post") or {}).items():
                stored = f"{p['stored_bits']:,}" if p.get("stored_bits") else ""
                exact = f"{p['exact_match']:.1%}" if p.get("exact_match") is not None else ""
                lines.append(f"| {r['run']} | {step} | {p['bits']:,.0f} | {p['R']:.3f} | {stored} "
                             f"| {exact} |")
    path = out / "results.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _ci(r: dict) -> str:
    return f" +- {r['R_ci95']:.3f}" if r.get("R_ci95") else ""


def _counts(rows: list[dict]) -> str:
    states = {}
    for r in rows:
        states[r["status"]] = states.get(r["status"], 0) + 1
    return f"{len(rows)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(states.items()))
