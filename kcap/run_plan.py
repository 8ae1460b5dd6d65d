"""What a run is about to do, said before it does it.

Every run prints its plan first: the model's counted parameters, the knowledge its data
holds and the R_max that follows (no model can store more than R_max bits per parameter
of this data, so a run with R_max below ~2 cannot show the paper's 2 bits/param law), the
tokens and steps it will train, and, after its first few steps, the time the whole run will
take at that pace, with a warning when that is more than a day on this device.
"""
from __future__ import annotations

import time

INFEASIBLE_HOURS = 24.0
PAPER_LAW = 2.0  # bits per parameter (spec section 1)


def human(n: float) -> str:
    """1234567 -> '1.2M' (for token counts)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    """A rough human duration: '40 s', '3.5 minutes', '2.1 hours', '9.4 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} minutes"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def describe(cfg, plan: dict, params: dict, bits_max: float, precision: str, device: str) -> list[str]:
    """The plan of a run as lines of text (see the module docstring)."""
    d = cfg.data
    if d.kind == "bioS":
        data = f"bioS({d.n:,}, {d.variant})"
    elif d.kind == "bioR":
        data = f"bioR({d.n:,}, {_rewrites(d.bior)} rewrites per person)"
    else:
        data = f"bioD(N={d.n:,}, K={d.k}, C={d.c}, D={d.d}, L={d.l}, T={d.t})"
    if d.junk_n:
        data += f" + junk bioS({d.junk_n:,}) at {d.junk_ratio[0]}:{d.junk_ratio[1]}"
    r_max = bits_max / params["counted"]
    limit = (f"; below the paper's ~{PAPER_LAW:g} bits/param, so this run cannot show that law "
             "(R <= R_max): more people or a smaller model would") if r_max < PAPER_LAW else ""
    tokens = plan["steps"] * plan["batch_size"] * cfg.window
    return [
        f"model {cfg.model}: {params['counted']:,} parameters counted for capacity "
        f"({params['total']:,} in all)",
        f"data {data}, {cfg.exposures:,} exposures: {bits_max:,.0f} bits of knowledge, so "
        f"R_max = {r_max:.3f} bits/param{limit}",
        f"plan: {plan['steps']:,} steps x {plan['batch_size']} windows x {cfg.window} tokens = "
        f"{human(tokens)} tokens ({human(plan['useful_tokens'])} of biographies), lr "
        f"{plan['lr']:g}, warmup {plan['warmup']:,}; {precision} on {device}",
    ]


def _rewrites(folder: str) -> str:
    """'2' or '2-3': the rewrites per person of a bioR import (from its bior.json)."""
    from kcap.data.bior import read_meta

    per = read_meta(folder)["rewrites_per_person"]
    return f"{per['min']}" if per["min"] == per["max"] else f"{per['min']}-{per['max']}"


class Pace:
    """Times steps ``start + skip`` .. ``start + skip + measure`` (the first ones pay for
    compilation and allocation) and, once, returns the estimated time of the whole run."""

    def __init__(self, start: int, steps: int, skip: int = 1, measure: int = 5):
        self.first, self.last, self.steps = start + skip, start + skip + measure, steps
        self.clock = None
        self.done = start >= steps

    def after_step(self, step: int) -> tuple[str, bool] | None:
        """(message, infeasible) once the pace is measured; None before and after that."""
        if self.done:
            return None
        if step == self.first or (self.clock is None and step > self.first):
            self.clock, self.first = time.perf_counter(), step
            return None
        if self.clock is None or (step < self.last and step < self.steps):
            return None
        self.done = True
        if step >= self.steps:  # a run this short needs no estimate
            return None
        per_step = (time.perf_counter() - self.clock) / max(1, step - self.first)
        left = per_step * (self.steps - step)
        infeasible = left > INFEASIBLE_HOURS * 3600
        message = (f"pace {per_step * 1e3:,.1f} ms/step: the remaining {self.steps - step:,} steps "
                   f"need ~{duration(left)} on this device (evaluations not included)")
        if infeasible:
            message += (f"; more than {INFEASIBLE_HOURS:g} hours: use a faster device (a GPU), or "
                        "fewer people, exposures or a smaller model")
        return message, infeasible
