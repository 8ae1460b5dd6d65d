"""Where a solo training step's time goes (issue 14: the GPU demo ran at ~41 ms per step,
about 3% of the card): torch.profiler over kcap's own training loop, the demo's model and
batch, after a warm-up run (autotuning, compilation and caches are not what is asked).

Writes bench/results/profile-<cpu|gpu>-<date>.md: the wall time per step of the profiled
run, the GPU's busy time per step (kernels summed: the rest of the step is host overhead
or waiting), and the operators ranked by their own device time (CPU time without a GPU).
Beside it, unprofiled, the same run's tokens/s with its batches rendered ahead by a child
process (kcap.prefetch, the GPU default) and rendered in line: what the prefetch buys.
On the project's CPU it profiles the CPU demo's model: a harness check and an account of
where CPU time goes, not a GPU figure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import environment, result_stem

ROWS = 30


def _config(gpu: bool, steps: int):
    from kcap.demo import PRESETS

    base = PRESETS["gpu" if gpu else "cpu"]
    # no evaluation but a tiny final one, no checkpoint but the last: the steps themselves
    return dataclasses.replace(base, steps=steps, eval_every=0, eval_sample=16,
                               checkpoint_every=0, log_every=5)


@contextlib.contextmanager
def _prefetch(on: bool):
    """Training with batches rendered ahead (a child process) or in line, on any device."""
    import kcap.train

    saved = kcap.train.use_prefetch
    kcap.train.use_prefetch = lambda device: on
    try:
        yield
    finally:
        kcap.train.use_prefetch = saved


def _tokens_per_s(run_dir: Path) -> float:
    """Median training rate of a run's log records, the first (warm-up) interval left out."""
    from kcap.run_log import read_log

    rates = [r["tokens_per_s"] for r in read_log(run_dir) if "tokens_per_s" in r]
    return statistics.median(rates[1:] or rates)


def run(quick: bool = False) -> Path:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kcap.atomic import write_text
    from kcap.train import train

    gpu = torch.cuda.is_available()
    steps = 20 if quick else 60
    with tempfile.TemporaryDirectory() as tmp:
        train(_config(gpu, 10), Path(tmp) / "warmup", progress=False)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            train(_config(gpu, steps), Path(tmp) / "profiled", progress=False)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    busy_us = None
    if gpu:  # device-side events only (kernels, copies): summing the ops would count twice
        from torch.autograd import DeviceType

        busy_us = sum(e.time_range.elapsed_us() for e in prof.events()
                      if e.device_type == DeviceType.CUDA)
    env = environment()
    lines = [f"# profile of the solo training loop ({'GPU' if gpu else 'CPU'} demo model)", "",
             f"- device: {env['device']} ({env['cpu_count']} CPUs)",
             f"- versions: python {env['python']}, torch {env['torch']}, triton {env['triton']}",
             f"- date: {env['date']}, commit {env['git_commit']}", f"- command: `{env['command']}`",
             f"- run: {_config(gpu, steps).model}, batch {_config(gpu, steps).batch_size} x "
             f"{_config(gpu, steps).window} tokens, {steps} steps after a 10-step warm-up run",
             f"- wall time of the profiled run: {wall:.2f} s, {wall / steps * 1e3:.1f} ms per step "
             "(setup, a final evaluation of 16 people and the last checkpoint included; the "
             "profiler adds its own overhead)"]
    if busy_us is not None:
        lines.append(f"- device busy: {busy_us / 1e3:.1f} ms in all, {busy_us / steps / 1e3:.2f} "
                     "ms per step: the rest of each step is host work or waiting")
    # on a GPU the rows are kernels and the CPU ops that launched them; sorting by device
    # time puts the kernels that fill the step first
    lines += ["", "```", averages.table(sort_by=key, row_limit=ROWS), "```", ""]
    path = result_stem("profile", env, "gpu" if gpu else "cpu").with_suffix(".md")
    write_text(path, "\n".join(lines))  # written now: a stage cut short keeps the profile
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, on in (("child process", True), ("in line", False)):
            folder = Path(tmp) / label.replace(" ", "-")
            with _prefetch(on):
                train(_config(gpu, steps), folder, progress=False)
            rates[label] = _tokens_per_s(folder)
    lines.insert(lines.index("```") - 1, f"- data rendered ahead by a child process: "
                 f"{rates['child process']:,.0f} tokens/s; in line: {rates['in line']:,.0f} tokens/s "
                 f"({rates['child process'] / rates['in line']:.2f}x; unprofiled runs of {steps} "
                 "steps, median of their logged intervals but the first)")
    write_text(path, "\n".join(lines))
    print("\n".join(lines[:11]))
    print(f"wrote {path}")
    return path
