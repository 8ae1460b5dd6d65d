"""Packs in a sweep: the runner's way to fill a GPU with tiny models.

``plan_units`` groups the runs of a sweep that can train as one pack (kcap/pack/trainer.py:
same model, options, window, precision and device; no MoE) into ``PackJob``s of at most
``pack_size`` runs; the others stay solo ``RunJob``s. An executor runs a PackJob like any
job: it trains its unfinished runs with ``train_pack`` (each run folder ends as the solo
trainer leaves it), then does each run's post-steps and writes each run's row.

``--pack auto`` packs on a GPU only: on a CPU a pack is slower than the same models one after
another (bench/results/pack-cpu-*), the computation being bound by arithmetic there, not by
per-step overhead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kcap.experiments.job import RunJob, execute

PACK_MODES = ("auto", "on", "off")
MAX_PACK = 16
# Bytes per parameter of a packed model, all fp32: weights, gradient (twice at the end of
# the backward: the blocks' gradients and their concatenation), two Adam moments, the
# optimizer's two work buffers, and the solo copy of weights and moments kept for
# checkpoints (see kcap/pack/stacked.py, optimizer.py, trainer.py).
BYTES_PER_PARAM = 4 * 10


@dataclass
class PackJob:
    """Runs of one sweep trained as one pack; ``name`` and ``folder`` as any job's."""
    jobs: list[RunJob]

    @property
    def name(self) -> str:
        return f"pack-{self.jobs[0].name}-x{len(self.jobs)}"

    @property
    def folder(self) -> Path:
        return Path(self.jobs[0].sweep) / "jobs" / self.name

    def __call__(self) -> dict:
        from kcap.pack.trainer import train_pack

        todo = [j for j in self.jobs
                if j.result() is None and not (j.run_dir / "report.json").exists()]
        if todo:
            train_pack([j.run.config for j in todo], [j.run_dir for j in todo], resume=True,
                       progress=False)
        return {"runs": {j.name: execute(j) for j in self.jobs}}


def members(unit) -> list[RunJob]:
    return unit.jobs if isinstance(unit, PackJob) else [unit]


def _key(job: RunJob) -> str | None:
    """What runs must share to be packed (None: never packed)."""
    cfg = job.run.config
    if cfg.model.startswith("gpt2moe") or cfg.precision == "fp16":
        return None
    return json.dumps([cfg.model, cfg.model_options, cfg.window, cfg.precision, cfg.device,
                       cfg.compile], sort_keys=True)


def pack_size(job: RunJob, memory_bytes: int | None) -> int:
    """Runs per pack for ``job``'s shape: MAX_PACK, fewer where ``memory_bytes`` (the device
    memory one executor slot may use) would not hold them with their activations."""
    if memory_bytes is None:
        return MAX_PACK
    from kcap.experiments.grids import run_facts

    cfg = job.run.config
    d = int(cfg.model.split("-")[2]) * 64
    layers = int(cfg.model.split("-")[1])
    tokens = cfg.batch_size * cfg.window
    # activations kept for the backward pass (~34 values per token, layer and width unit,
    # Korthikanti et al.) in 2 bytes, plus fp32 logits and their gradient unless the fused
    # LM head + loss (loss_impl auto or triton: the default on GPUs) never forms them
    logits = 2 * 4 * 4337 if cfg.model_options.get("loss_impl", "auto") == "torch" else 0
    activations = tokens * (34 * d * layers * 2 + logits)
    per_model = run_facts(job.run)["params_total"] * BYTES_PER_PARAM + activations
    return max(1, min(MAX_PACK, int(0.8 * memory_bytes // per_model)))


def plan_units(jobs: list[RunJob], mode: str, on_gpu: bool, memory_bytes: int | None = None):
    """The jobs as units for the executor: PackJobs of compatible runs (``mode`` "on", or
    "auto" on a GPU) and solo RunJobs."""
    if mode not in PACK_MODES:
        raise ValueError(f"pack must be one of {PACK_MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not on_gpu):
        return list(jobs)
    groups: dict[str, list[RunJob]] = {}
    units = []
    for j in jobs:
        key = _key(j)
        if key is None:
            units.append(j)
        else:
            groups.setdefault(key, []).append(j)
    for group in groups.values():
        size = pack_size(group[0], memory_bytes)
        for lo in range(0, len(group), size):
            chunk = group[lo:lo + size]
            units.append(chunk[0] if len(chunk) == 1 else PackJob(chunk))
    return units
