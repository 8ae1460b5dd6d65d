"""The quantities the paper's claims are about, computed from results-table rows: peak R,
ratios between architectures, capacity kept after quantization, junk ratios.

Every function takes rows (dicts, kcap/experiments/results.py) and returns Findings: the
measured value (None where the grid holds nothing to measure it), its 95% interval where it
has one, and the paper's claim beside it.
"""
from __future__ import annotations

import math

from kcap.experiments.spec import Finding


def done(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "done" and r.get("R") is not None]


def best_of_lr(rows: list[dict]) -> list[dict]:
    """One row per point of an lr sweep: the one with the highest R (the paper's rule for its
    negative results); rows without an "lr" label pass through."""
    best = {}
    for r in done(rows):
        key = tuple(sorted((k, str(v)) for k, v in r["labels"].items() if k != "lr"))
        if key not in best or r["R"] > best[key]["R"]:
            best[key] = r
    return list(best.values())


def where(rows: list[dict], **labels) -> list[dict]:
    return [r for r in rows if all(r["labels"].get(k) == v for k, v in labels.items())]


def peak(rows: list[dict], claim: str, paper_value: float, quantity="peak R (bits/param)") -> Finding:
    rows = done(rows)
    if not rows:
        return Finding(quantity, None, None, claim, paper_value, "no finished run")
    top = max(rows, key=lambda r: r["R"])
    return Finding(quantity, top["R"], top.get("R_ci95"), claim, paper_value, f"run {top['run']}")


def highest(rows: list[dict], ceiling: float) -> Finding:
    rows = done(rows)
    measured = max((r["R"] for r in rows), default=None)
    return Finding("highest R of any run", measured, None, f"paper: no model above {ceiling}",
                   ceiling)


def reaches_r_max(rows: list[dict], below: float = 1.8) -> Finding:
    """Models whose R_max <= ``below`` should store (nearly) all the data holds."""
    rows = [r for r in done(rows) if r["R_max"] <= below]
    if not rows:
        return Finding(f"R / R_max of models with R_max <= {below}", None, None,
                       "paper: ~1 (R reaches R_max)", 1.0, "no such run in the grid")
    worst = min(rows, key=lambda r: r["R"] / r["R_max"])
    return Finding(f"lowest R / R_max of models with R_max <= {below}", worst["R"] / worst["R_max"],
                   None, "paper: ~1 (R reaches R_max)", 1.0, f"{len(rows)} runs; worst {worst['run']}")


def ratio(rows: list[dict], arch: str, claim: str, paper_value: float, baseline: str = "gpt2",
          match=("n", "exposures", "size")) -> Finding:
    """Geometric mean over matched pairs of R(arch) / R(baseline)."""
    rows = done(rows)
    base = {tuple(r["labels"].get(k) for k in match): r for r in rows
            if r["labels"].get("arch") == baseline}
    logs = [math.log(r["R"] / base[key]["R"]) for r in rows if r["labels"].get("arch") == arch
            for key in [tuple(r["labels"].get(k) for k in match)]
            if key in base and r["R"] > 0 and base[key]["R"] > 0]
    quantity = f"R({arch}) / R({baseline})"
    if not logs:
        return Finding(quantity, None, None, claim, paper_value, "no matched pair with R > 0")
    return Finding(quantity, math.exp(sum(logs) / len(logs)), None, claim, paper_value,
                   f"geometric mean of {len(logs)} pairs")


def kept(rows: list[dict], step: str, claim: str, paper_value: float) -> Finding:
    """Mean over runs of R after post-step ``step`` / R as trained."""
    pairs = [(r["post"][step]["R"], r["R"]) for r in done(rows)
             if step in (r.get("post") or {}) and r["R"] > 0]
    quantity = f"R after {step} / R trained"
    if not pairs:
        return Finding(quantity, None, None, claim, paper_value, "no quantized run")
    return Finding(quantity, sum(a / b for a, b in pairs) / len(pairs), None, claim, paper_value,
                   f"mean of {len(pairs)} runs")


def relative(rows: list[dict], of: dict, to: dict, quantity: str, claim: str,
             paper_value: float) -> Finding:
    """Mean R of the rows labelled ``of`` over mean R of those labelled ``to``."""
    a, b = where(done(rows), **of), where(done(rows), **to)
    if not a or not b or sum(r["R"] for r in b) <= 0:
        return Finding(quantity, None, None, claim, paper_value, "the grid lacks one side")
    mean = lambda rs: sum(r["R"] for r in rs) / len(rs)  # noqa: E731
    return Finding(quantity, mean(a) / mean(b), None, claim, paper_value,
                   f"{len(a)} vs {len(b)} runs")


def extraction(rows: list[dict]) -> list[Finding]:
    """Stored over extractable bits (the QA post-step), at the run nearest the capacity
    boundary (highest R) and on average; [] where no run has the QA step."""
    pairs = [(r["post"]["qa"]["knowledge_bits_same_people"], r["post"]["qa"]["bits"], r["R"])
             for r in done(rows) if (r.get("post") or {}).get("qa")]
    if not pairs:
        return []
    claim = "Part 3.3 A.2: ~1.2x at the capacity boundary"
    quantity = "stored / extractable bits (QA)"
    usable = [(s / e, R) for s, e, R in pairs if e > 0 and s > 0]
    if not usable:
        return [Finding(quantity, None, None, claim, 1.2,
                        f"{len(pairs)} runs, none with extractable bits > 0")]
    best = max(usable, key=lambda x: x[1])
    return [Finding(quantity, best[0], None, claim, 1.2,
                    f"the run with the highest R ({best[1]:.3f}); mean over {len(usable)} runs "
                    f"{sum(x[0] for x in usable) / len(usable):.2f}x")]
