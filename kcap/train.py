"""The lean trainer: exposure-based budgets, AdamW with warmup + cosine, mixed precision,
atomic resumable checkpoints, capacity evaluation, data parallelism via torchrun.

A run is a pure function of its TrainConfig: ``train(cfg)`` on CPU gives the same bytes
every time, and a run killed at any moment and resumed (``resume=True``) ends with the same
weights as one that never stopped, because the checkpoint holds everything the next step
reads: weights, optimizer moments, the step and the data streams' (cursor, offset).

This module holds the solo step loop; the setup before it and the bookkeeping around it
(checkpoints, log records, evaluations, report) are kcap.run_setup's, shared with the pack
trainer (kcap.pack.trainer) so that both leave the same run folders.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from kcap import checkpoint, run_plan
from kcap.budget import learning_rate
from kcap.console import note, warn
from kcap.prefetch import PrefetchedStream, tokens_on, use_prefetch
from kcap.run_lock import run_lock
from kcap.run_log import read_log  # noqa: F401  (re-exported: the log's reader)
from kcap.run_config import PRECISIONS, DataConfig, TrainConfig  # noqa: F401  (re-exported)
# the shared setup and bookkeeping (kcap.run_setup), re-exported under their old names
from kcap.run_setup import (NEGATIVE_BITS, FiniteWatch, TrainingDiverged, _fingerprint,  # noqa: F401
                            _optimizer, _resume_point, _resume_threads, build_data, open_run,
                            resolve, stream_exposures)


@contextmanager
def _caller_threads():
    """Give the caller back its CPU thread count (a resumed run may change it)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(cfg: TrainConfig, run_dir, resume: bool = False, progress: bool = True) -> dict:
    """Train, evaluate and write ``run_dir/report.json`` and ``training.png``; return the report.

    ``resume``: continue from the run's newest intact checkpoint (refused if it belongs to
    another configuration). Without it, a run folder that already holds checkpoints is
    refused. The main rank holds the run folder's lock (kcap.run_lock) throughout, so a
    second writer into the same folder is refused instead of mixing two runs.
    """
    from kcap import distributed

    run_dir = Path(run_dir)
    dist = distributed.init()
    with (run_lock(run_dir, "train") if dist.is_main else nullcontext()), _caller_threads():
        return _train(cfg, run_dir, resume, progress, dist)


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, progress: bool, dist) -> dict:
    run = open_run(cfg, run_dir, resume, dist)
    if use_prefetch(run.device):  # checkpoints then record the batches consumed, not rendered
        run.stream = PrefetchedStream(run.stream, run.plan["batch_per_rank"],
                                      pin=run.device.type == "cuda")
    try:
        return _loop(run, progress, dist)
    finally:
        if isinstance(run.stream, PrefetchedStream):
            run.stream.close()


def _loop(run, progress: bool, dist) -> dict:
    import torch
    from tqdm.auto import tqdm

    from kcap.data.tokenizer import PAD_ID

    cfg, run_dir = run.cfg, run.run_dir
    model, opt, stream, steps, step = run.model, run.opt, run.stream, run.steps, run.step
    net = dist.wrap(model)
    forward = torch.compile(net) if cfg.compile else net
    bar = tqdm(total=steps, initial=step, unit="step", disable=not (progress and dist.is_main),
               dynamic_ncols=True)
    pace = run_plan.Pace(step, steps)
    clock, last_step = time.perf_counter(), step
    watch = FiniteWatch(run.device)

    def diverged(at, value):
        return TrainingDiverged(
            f"loss is {value} at step {at}; stopped. The last good checkpoint is "
            f"{checkpoint.latest(run_dir)}; try a lower lr, or bf16/fp32 instead of fp16")
    model.train()
    while step < steps:
        lr = learning_rate(step, steps, run.plan["lr"], run.plan["warmup"], cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        windows = stream.next_windows(run.plan["batch_per_rank"])
        # The last batch of the exposures may be partial; every rank stops together once
        # any rank has nothing left (only possible when steps was set by hand, or on the
        # ragged end of data-parallel shards).
        if dist.all_min(len(windows)) == 0:
            break
        tokens = tokens_on(stream, windows, run.device)
        x, y = tokens[:, :-1], tokens[:, 1:].clone()
        y[y == PAD_ID] = -100
        with run.autocast():
            _, loss = forward(x, y)
        watch.update(loss, step)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(opt)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        run.scaler.step(opt)
        run.scaler.update()
        opt.zero_grad(set_to_none=True)
        step = run.step = step + 1
        bar.update(1)
        measured = pace.after_step(step) if dist.is_main else None
        if measured:
            (warn if measured[1] else note)(measured[0])
        logging = step % max(1, cfg.log_every) == 0 or step == steps
        evaluating = cfg.eval_every and step % cfg.eval_every == 0 and step < steps
        saving = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == steps
        if logging or evaluating or saving:  # every rank, so that all stop together
            watch.check(diverged)
        if dist.is_main and logging:
            elapsed = time.perf_counter() - clock
            rate = (step - last_step) * run.tokens_per_step / max(elapsed, 1e-9)
            clock, last_step = time.perf_counter(), step
            run.log_step(loss.item(), lr, rate)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
        if evaluating:
            if dist.is_main:
                bar.write(run.log_eval(run.evaluate()))
            dist.barrier()
        if saving:
            run.save(step)
    if run.saved_step != step:  # the data ended early: the final weights still get saved
        watch.check(diverged)
        run.save(step)
    bar.close()
    report = run.finish()
    dist.shutdown()
    return report
