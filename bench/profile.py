"""Where a solo training step's time goes (issue 14: the GPU demo ran at ~41 ms per step,
about 3% of the card): torch.profiler over kcap's own training loop, the demo's model and
batch, after a warm-up run (autotuning, compilation and caches are not what is asked).

Writes bench/results/profile-<cpu|gpu>-<date>.md: the wall time per step of the profiled
run, the GPU's busy time per step (kernels summed: the rest of the step is host overhead
or waiting), and the operators ranked by their own device time (CPU time without a GPU).
On the project's CPU it profiles the CPU demo's model: a harness check and an account of
where CPU time goes, not a GPU figure.
"""
from __future__ import annotations

import dataclasses
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
                               checkpoint_every=0, log_every=10)


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
    write_text(path, "\n".join(lines))
    print("\n".join(lines[:10]))
    print(f"wrote {path}")
    return path
