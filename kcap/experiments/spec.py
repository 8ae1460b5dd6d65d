"""What an experiment is: a grid of runs (data), the paper's claim it tests, and how its
figure and findings are drawn from the results table.

A ``Run`` is one training configuration with the labels a figure groups it by and the steps
that follow training (quantize-then-eval, ...). Runs are plain picklable data, so that any
executor (a local process, a Slurm array task, a pack of models) can carry them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from kcap.run_config import TrainConfig

PRESETS = ("smoke", "gpu", "paper")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]*")


POST_OPTIONS = {"quantize": {"bits", "method", "group_size"},
                "qa": {"epochs", "rank", "alpha", "lr", "batch_size", "where"}}


@dataclass(frozen=True)
class PostStep:
    """Something done to a trained run before it is measured again.

    kind "quantize": options bits (4 or 8), method ("rtn" or "gptq"), group_size; the
    quantized model is evaluated on the same people and reported under ``name``.
    kind "qa": options of kcap.qa.QAConfig (epochs, rank, alpha, lr, batch_size, where);
    the QA extraction test (``kcap qa``), reported as extractable bits under ``name``.
    """
    name: str
    kind: str
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"post-step name must be lowercase letters, digits and _.+-, got "
                             f"{self.name!r}")
        if self.kind not in POST_OPTIONS:
            raise ValueError(f"post-step kind must be one of {sorted(POST_OPTIONS)}, got {self.kind!r}")
        unknown = set(self.options) - POST_OPTIONS[self.kind]
        if unknown:
            raise ValueError(f"post-step {self.name}: unknown options {sorted(unknown)}")


@dataclass(frozen=True)
class Run:
    """One run of a sweep: ``name`` is its folder (unique in the sweep), ``labels`` what
    figures and findings group it by (arch, n, exposures, lr, junk ...)."""
    name: str
    config: TrainConfig
    labels: dict = field(default_factory=dict)
    post: tuple[PostStep, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"run name must be lowercase letters, digits and _.+-, got {self.name!r}")
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"run {self.name}: config must be a TrainConfig, got "
                            f"{type(self.config).__name__}")
        if len({p.name for p in self.post}) != len(self.post):
            raise ValueError(f"run {self.name}: post-step names repeat")


@dataclass(frozen=True)
class Finding:
    """One line of results.md: a measured quantity beside the paper's claim about it."""
    quantity: str          # "peak R (bits/param)"
    measured: float | None  # None: the grid holds no run that measures it
    ci95: float | None     # half-width, when the quantity has one
    claim: str             # "paper: >= 2"
    paper_value: float | None = None  # the number the factor is taken against
    note: str = ""

    @property
    def factor(self) -> float | None:
        if self.measured is None or not self.paper_value:
            return None
        return self.measured / self.paper_value


@dataclass(frozen=True)
class Experiment:
    """A headline result of the paper as a grid per preset.

    ``grids[preset]()`` returns the runs; ``findings(rows)`` turns the results table's rows
    (dicts, see kcap/experiments/results.py) into Findings; ``figure`` names a figure kind
    of kcap/experiments/figures.py, drawn with ``figure_options``. ``lr_sweep``: runs that differ only in lr (labels equal
    but for "lr") are one point, reported by the best of them, as the paper does for its
    negative results.
    """
    key: str
    title: str
    claim: str
    varies: str
    grids: dict[str, Callable[[], list[Run]]]
    findings: Callable[[list[dict]], list[Finding]]
    figure: str
    lr_sweep: bool = False
    figure_options: dict = field(default_factory=dict)

    def grid(self, preset: str) -> list[Run]:
        if preset not in self.grids:
            raise ValueError(f"experiment {self.key} has presets {sorted(self.grids)}, not "
                             f"{preset!r}")
        runs = self.grids[preset]()
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.key} ({preset}): run names repeat")
        return runs
