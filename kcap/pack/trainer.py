"""Train M runs as one pack: one StackedModels, one StackedAdamW, M run folders that each
look exactly as the solo trainer (kcap.train.train) leaves them.

Why: tiny models cannot fill a GPU one at a time (issue 14); a pack steps them together.
What stays per run: its config (seed, data, exposures, lr, weight decay, warmup, batch
size, steps, clipping, log/eval/checkpoint cadence), its step count, its schedule (the
solo ``learning_rate``), its log.jsonl, its checkpoints (solo format, so a run started in
a pack can be resumed solo and vice versa), its report.json and training.png, written
when that run finishes while the others go on.

How it reuses the solo trainer: every run is opened by kcap.run_setup.open_run (plan,
data, model init under the run's seed, resume, config.json) and keeps its solo model and
torch AdamW as the vessel for checkpoints and evaluations: before a run saves or is
evaluated, its slice of the pack's weights and optimizer state is copied into them
(``_sync``), then the solo ``Run.save`` / ``Run.evaluate`` / ``Run.finish`` do the rest.
The cost: the solo copies hold the weights and moments a second time (small for the tiny
models packs are for).

The step: each active run draws its own batch from its own stream; batches are padded to
the pack's largest batch size with targets -100 (the pack's losses are per-model means
over each model's own targets), the summed loss is backpropagated (each model gets the
gradient it would get alone) and StackedAdamW steps the active models with their own lr
and clipping. A finished run keeps its (all-ignored) rows, so every step of a pack has the
same shapes and a resumed pack computes the same bits as one that never stopped.

``compile = true`` (shared by the pack's runs) compiles the pack's forward and backward
once (the padded batches keep every step's shapes); the optimizer stays eager.

Equivalence with solo runs: fp32 on CPU, equal up to fp32 reassociation of the gradients
(tests/pack). On CUDA the same code runs under autocast as the solo trainer does (bf16;
fp16 is refused: it would need a loss scaler per model); this path is untested so far.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from kcap import checkpoint
from kcap.budget import learning_rate
from kcap.console import note
from kcap.run_config import TrainConfig
from kcap.run_lock import run_lock
from kcap.prefetch import PrefetchedStream, tokens_on, upload, use_prefetch
from kcap.run_setup import FiniteWatch, Run, TrainingDiverged, open_run

# fields every run of a pack must share (one architecture, one window, one device/precision)
SHARED_FIELDS = ("model", "model_options", "window", "precision", "device", "compile")


def check_packable(cfgs: list[TrainConfig]) -> None:
    """Raise a one-line ValueError unless ``cfgs`` can train as one pack: the SHARED_FIELDS
    equal, no MoE model, no fp16."""
    from kcap.models import model_config

    if not isinstance(cfgs, (list, tuple)) or not cfgs:
        raise ValueError("a pack needs a non-empty list of TrainConfigs")
    for i, cfg in enumerate(cfgs):
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"pack config {i} is a {type(cfg).__name__}, not a TrainConfig")
    for name in SHARED_FIELDS:
        for i, cfg in enumerate(cfgs[1:], 1):
            if getattr(cfg, name) != getattr(cfgs[0], name):
                raise ValueError(f"runs of a pack must share {name}: config {i} has "
                                 f"{getattr(cfg, name)!r}, config 0 has {getattr(cfgs[0], name)!r}")
    first = cfgs[0]
    if model_config(first.model, 1, context=first.window, **first.model_options).n_experts:
        raise ValueError(f"{first.model} is a MoE model: MoE models cannot be packed (the router "
                         "is not batched over models); train them solo")
    if first.precision == "fp16":
        raise ValueError("precision fp16 cannot be packed (it needs a loss scaler per model); "
                         "use bf16 or fp32")


def train_pack(cfgs: list[TrainConfig], run_dirs: list, resume: bool = True,
               progress: bool = True) -> list[dict]:
    """Train ``cfgs[i]`` into ``run_dirs[i]`` for every i as one pack; return the reports
    (as kcap.train.train returns them, in the order of ``cfgs``).

    Each run folder ends as ``train(cfgs[i], run_dirs[i], resume=True)`` would leave it.
    ``resume``: continue every run from its newest intact checkpoint (runs may stand at
    different steps); without it, a folder that holds checkpoints is refused. The lock of
    every run folder is held for the whole pack. Single process (no torchrun).
    """
    from kcap.train import _caller_threads

    check_packable(cfgs)
    if not isinstance(run_dirs, (list, tuple)) or len(run_dirs) != len(cfgs):
        raise ValueError(f"train_pack needs one run folder per config: {len(cfgs)} configs, "
                         f"{len(run_dirs) if isinstance(run_dirs, (list, tuple)) else run_dirs!r} run folders")
    run_dirs = [Path(d) for d in run_dirs]
    seen: dict[Path, int] = {}
    for i, d in enumerate(run_dirs):
        key = d.resolve()
        if key in seen:
            raise ValueError(f"run folder {d} is given twice (configs {seen[key]} and {i}); "
                             "each run of a pack needs its own folder")
        seen[key] = i
    with ExitStack() as held, _caller_threads():
        for d in run_dirs:
            held.enter_context(run_lock(d, "train (pack)"))
        return _train_pack(cfgs, run_dirs, resume, progress)


def _train_pack(cfgs, run_dirs, resume: bool, progress: bool) -> list[dict]:
    from kcap.distributed import Dist

    dist = Dist()  # a pack is one process
    runs = [open_run(cfg, d, resume, dist) for cfg, d in zip(cfgs, run_dirs)]
    if use_prefetch(runs[0].device):  # each run's next batch rendered during the step
        for r in runs:
            r.stream = PrefetchedStream(r.stream, r.plan["batch_per_rank"],
                                        pin=r.device.type == "cuda")
    try:
        return _loop(runs, run_dirs, progress)
    finally:
        for r in runs:
            if isinstance(r.stream, PrefetchedStream):
                r.stream.close()


def _loop(runs: list[Run], run_dirs, progress: bool) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from kcap.pack import StackedAdamW, StackedModels

    pack = StackedModels([r.model for r in runs])
    # every step of a pack has the same shapes (batches padded to the widest), so a compiled
    # forward (and its backward) is traced once; the optimizer stays eager (~15 ops a step)
    forward = torch.compile(pack) if runs[0].cfg.compile else pack
    opt = StackedAdamW(pack, lr=[r.plan["lr"] for r in runs],
                       weight_decay=[r.plan["weight_decay"] for r in runs],
                       betas=([r.cfg.betas[0] for r in runs], [r.cfg.betas[1] for r in runs]),
                       eps=[r.cfg.eps for r in runs], max_grad_norm=[r.cfg.grad_clip for r in runs])
    for i, r in enumerate(runs):
        opt.load_model_state(i, r.opt.state_dict())
    note(f"pack of {len(runs)} runs: " + ", ".join(str(d) for d in run_dirs))
    reports: list = [None] * len(runs)
    active = [r.step < r.steps for r in runs]
    for i, r in enumerate(runs):  # resumed at their last step: only the final evaluation is left
        if not active[i]:
            reports[i] = _finish(runs, i, pack, opt)
    width = max(r.plan["batch_per_rank"] for r in runs)
    bar = tqdm(total=max(r.steps - r.step for r in runs), unit="step", disable=not progress,
               dynamic_ncols=True)
    clocks = [(time.perf_counter(), r.step) for r in runs]
    watch = FiniteWatch(runs[0].device, len(runs))
    pack.train()
    while any(active):
        lrs, ids, targets, ended = _batch(runs, active, width, opt)
        for i in ended:  # the data ran out: the solo trainer stops here too
            active[i] = False
        if any(active):
            losses = _step(runs, active, forward, opt, lrs, ids, targets, watch)
            bar.update(1)
            for i, r in enumerate(runs):
                if active[i]:
                    clocks[i] = _after_step(runs, i, pack, opt, losses, lrs[i], clocks[i], bar,
                                            watch)
        for i, r in enumerate(runs):
            if reports[i] is None and (i in ended or (active[i] and r.step >= r.steps)):
                active[i] = False
                _check(runs, watch)
                reports[i] = _finish(runs, i, pack, opt)
    bar.close()
    return reports


def _batch(runs: list[Run], active: list[bool], width: int, opt):
    """This step's lrs (M floats), ids and targets ((M, width, window) int64 on the pack's
    device; padding rows: ids 0, targets -100) and the runs whose data has ended."""
    import torch

    from kcap.data.tokenizer import PAD_ID

    window = runs[0].cfg.window
    pin = runs[0].device.type == "cuda"  # a fresh pinned buffer: copies below do not block
    ids = torch.zeros(len(runs), width, window, dtype=torch.int64, pin_memory=pin)
    targets = torch.full((len(runs), width, window), -100, dtype=torch.int64, pin_memory=pin)
    lrs, ended = list(opt.lr), []
    for i, r in enumerate(runs):
        if not active[i]:
            continue
        lrs[i] = learning_rate(r.step, r.steps, r.plan["lr"], r.plan["warmup"], r.cfg.min_lr_ratio)
        windows = r.stream.next_windows(r.plan["batch_per_rank"])
        if len(windows) == 0:
            opt.lr[i] = lrs[i]  # the solo trainer has set this step's lr before it stops
            ended.append(i)
            continue
        tokens = tokens_on(r.stream, windows, torch.device("cpu"))
        y = tokens[:, 1:].clone()
        y[y == PAD_ID] = -100
        ids[i, :len(windows)], targets[i, :len(windows)] = tokens[:, :-1], y
    device = runs[0].device
    return lrs, ids.to(device, non_blocking=True), targets.to(device, non_blocking=True), ended


def _step(runs: list[Run], active: list[bool], forward, opt, lrs, ids, targets, watch):
    """One training step of the active runs (``forward``: the pack, or its compiled form);
    returns every model's loss ((M,) tensor on the device, 0 for inactive ones). Nothing
    here waits for the device: non-finite losses are recorded by ``watch`` and read at the
    next log, evaluation or checkpoint (``_check``)."""
    import torch

    with runs[0].autocast():
        _, losses = forward(ids, targets)
    device = losses.device
    watch.update(losses, upload(torch.tensor([r.step for r in runs]), device),
                 upload(torch.tensor(active), device))
    losses.sum().backward()
    opt.step(lrs, list(active))
    opt.zero_grad()
    return losses.detach()


def _check(runs: list[Run], watch) -> None:
    """Raise TrainingDiverged naming the first run whose loss was not finite."""
    def error(i, at, value):
        r = runs[i]
        return TrainingDiverged(
            f"{r.run_dir}: loss is {value} at step {at} (in a pack); stopped. The last good "
            f"checkpoint is {checkpoint.latest(r.run_dir)}; try a lower lr")
    watch.check(error)


def _after_step(runs: list[Run], i: int, pack, opt, losses, lr: float, clock, bar, watch):
    """Run i's bookkeeping after its step (the solo trainer's order: log record, evaluation,
    checkpoint); returns its new (clock, step at clock) for the tokens/s of its next record.
    ``losses``: the step's (M,) losses, read (a device synchronisation) only to log."""
    r = runs[i]
    r.step += 1
    cfg, step = r.cfg, r.step
    logging = step % max(1, cfg.log_every) == 0 or step == r.steps
    evaluating = cfg.eval_every and step % cfg.eval_every == 0 and step < r.steps
    if logging or evaluating or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) \
            or step == r.steps:
        _check(runs, watch)
    if logging:
        now = time.perf_counter()
        r.log_step(losses[i].item(), lr,
                   (step - clock[1]) * r.tokens_per_step / max(now - clock[0], 1e-9))
        clock = (now, step)
    if evaluating:
        _sync(runs, i, pack, opt)
        bar.write(f"{r.run_dir.name} " + r.log_eval(r.evaluate()))
    if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == r.steps:
        _sync(runs, i, pack, opt)
        r.save(step)
    return clock


def _sync(runs: list[Run], i: int, pack, opt) -> None:
    """Copy model i's weights and optimizer state from the pack into run i's solo model and
    torch AdamW (what checkpoints are written from and evaluations run on)."""
    stacked = dict(pack.named_stacked())  # a tied head's key maps to the embedding's tensor
    runs[i].model.load_state_dict({k: stacked[pack.aliases[k]][i] for k in pack.state_keys})
    runs[i].opt.load_state_dict(opt.state_for_model(i))


def _finish(runs: list[Run], i: int, pack, opt) -> dict:
    """Run i is done: its final checkpoint (if the data ended early), evaluation, report."""
    r = runs[i]
    _sync(runs, i, pack, opt)
    if r.saved_step != r.step:
        r.save(r.step)
    report = r.finish()
    note(f"{r.run_dir}: done at step {r.step:,}: {report['bits_learned']:,.0f} bits, "
         f"R = {report['capacity_ratio']:.3f}")
    return report
