"""The lean trainer: exposure-based budgets, AdamW with warmup + cosine, mixed precision,
atomic resumable checkpoints, capacity evaluation, data parallelism via torchrun.

A run is a pure function of its TrainConfig: ``train(cfg)`` on CPU gives the same bytes
every time, and a run killed at any moment and resumed (``resume=True``) ends with the same
weights as one that never stopped, because the checkpoint holds everything the next step
reads: weights, optimizer moments, the step and the data streams' (cursor, offset).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

from kcap import checkpoint, run_log, run_plan
from kcap.console import note, warn
from kcap.run_lock import run_lock
from kcap.run_log import read_log  # noqa: F401  (re-exported: the log's reader)
from kcap.budget import count_tokens, learning_rate, paper_recipe, steps_for
from kcap.run_config import PRECISIONS, DataConfig, TrainConfig  # noqa: F401  (re-exported)

class TrainingDiverged(RuntimeError):
    pass


def build_data(cfg: TrainConfig, rank: int = 0, world: int = 1, labels: bool = False):
    """(dataset, training stream, useful fraction of windows) of a config."""
    from kcap.data.biod import BioD, BioDConfig
    from kcap.data.bios import BioS, BioSConfig
    from kcap.data.stream import ExposureStream, MixtureStream

    d = cfg.data
    if d.kind == "bioS":
        ds = BioS(BioSConfig(n=d.n, seed=d.seed, variant=d.variant, marker=d.marker))
    elif d.kind == "bioD":
        ds = BioD(BioDConfig(n=d.n, k=d.k, c=d.c, d=d.d, l=d.l, t=d.t, seed=d.seed))
    else:
        raise ValueError(f"data.kind must be bioS or bioD, got {d.kind!r}")
    useful = ExposureStream(ds, cfg.exposures, cfg.window + 1, d.seed, rank, world, labels)
    if not d.junk_n:
        return ds, useful, 1.0
    if d.kind != "bioS":
        raise ValueError("junk mixtures are defined for bioS")
    junk = BioS(BioSConfig(n=d.junk_n, seed=d.seed, person_offset=d.n))
    stream = MixtureStream(useful, ExposureStream(junk, None, cfg.window + 1, d.seed, rank, world,
                                                  labels), d.junk_ratio, d.seed)
    return ds, stream, d.junk_ratio[0] / sum(d.junk_ratio)


def resolve(cfg: TrainConfig, world: int = 1) -> dict:
    """The derived quantities of a run: steps, warmup, lr, weight decay, batch per rank."""
    import dataclasses

    if cfg.recipe == "paper":
        cfg = dataclasses.replace(cfg, **paper_recipe(cfg.data.n, cfg.exposures, cfg.data.kind))
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of ranks ({world})")
    _, stream, useful_fraction = build_data(cfg)
    useful_stream = getattr(stream, "useful", stream)
    tokens = count_tokens(useful_stream)
    steps = cfg.steps or steps_for(tokens, cfg.batch_size, cfg.window + 1, useful_fraction)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, steps // 10)
    return {"steps": steps, "warmup": warmup, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
            "batch_size": cfg.batch_size, "batch_per_rank": cfg.batch_size // world,
            "useful_tokens": tokens}


def _optimizer(model, cfg: TrainConfig, lr: float, weight_decay: float, device):
    import torch

    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norm gains
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def _fingerprint(cfg: TrainConfig) -> dict:
    """What a checkpoint must agree with to be resumed (everything but the bookkeeping)."""
    d = asdict(cfg)
    for key in ("eval_every", "eval_sample", "log_every", "checkpoint_every", "keep_checkpoints",
                "device", "compile"):
        d.pop(key)
    return json.loads(json.dumps(d))


def _resume_point(run_dir: Path, resume: bool, is_main: bool) -> Path | None:
    """The checkpoint to resume from (None: start from step 0). On the main rank, corrupt
    newer checkpoints are set aside with a warning; without ``resume``, a folder holding
    checkpoints is refused, so nothing overwrites a good checkpoint."""
    folders = checkpoint.step_folders(run_dir)
    if folders and not resume:
        raise ValueError(f"{run_dir} already holds checkpoints ({folders[0].name}); pass resume "
                         "(--resume) to continue it, or choose a new run folder")
    corrupt = []
    good = checkpoint.newest_good(run_dir, lambda path, err: corrupt.append((path, err)))
    # only once an intact one is found: a run whose checkpoints are all corrupt keeps them
    # (newest_good raised), so the next attempt cannot silently restart from step 0
    for path, err in corrupt if is_main else ():
        aside = checkpoint.set_aside(path)
        warn(f"{err}; skipped (moved to {aside.name}), resuming from an older checkpoint")
    return good


def _resume_threads(recorded: int | None, device) -> None:
    """CPU results depend on the thread count (how reductions are split), so a resumed CPU
    run uses the count it was trained with when this machine has the cores for it (train()
    gives the caller its own count back)."""
    import os

    import torch

    if device.type != "cpu" or recorded is None or recorded == torch.get_num_threads():
        return
    if recorded <= (os.cpu_count() or 1):
        note(f"resuming with {recorded} CPU thread(s) as the run was trained (not "
             f"{torch.get_num_threads()}): CPU results depend on the thread count")
        torch.set_num_threads(recorded)
        return
    warn(f"this run was trained with {recorded} CPU threads and this machine has "
         f"{os.cpu_count()} cores: it goes on with {torch.get_num_threads()}, so its weights "
         "will differ in the last bits from an uninterrupted run")


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
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from kcap.atomic import write_json
    from kcap.capacity import data_bits_max
    from kcap.data.tokenizer import PAD_ID
    from kcap.models import build_model, parameter_report

    device = dist.device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision != "fp32" and device.type == "cpu":
        raise ValueError(f"precision {precision!r} needs a GPU; use fp32 on CPU")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    plan = resolve(cfg, dist.world)
    steps = plan["steps"]
    if dist.is_main:
        for leftover in checkpoint.remove_partial_writes(run_dir):
            note(f"removed {leftover.name}, a checkpoint write cut short by a kill")
        existing = _resume_point(run_dir, resume, True)
    dist.barrier()
    if not dist.is_main:  # after the main rank has set corrupt checkpoints aside
        existing = _resume_point(run_dir, resume, False)

    torch.manual_seed(cfg.seed)
    ds, stream, _ = build_data(cfg, dist.rank, dist.world)
    model = build_model(cfg.model, ds.tokenizer.vocab_size, context=cfg.window,
                        **cfg.model_options).to(device)
    opt = _optimizer(model, cfg, plan["lr"], plan["weight_decay"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = parameter_report(model, ds.used_token_ids())
    fingerprint = _fingerprint(cfg)
    step = 0
    if existing is not None:
        meta = checkpoint.load(existing, model, opt)
        if meta.get("fingerprint") != fingerprint:
            raise checkpoint.CheckpointError(
                f"{existing} belongs to another configuration; differing keys: "
                f"{sorted(k for k in fingerprint if meta.get('fingerprint', {}).get(k) != fingerprint[k])}")
        if len(meta["streams"]) != dist.world:
            raise checkpoint.CheckpointError(f"{existing} was written by {len(meta['streams'])} ranks, "
                                             f"this run has {dist.world}")
        stream.load_state_dict(meta["streams"][dist.rank])
        step = meta["step"]
        _resume_threads(meta.get("cpu_threads"), device)
        if dist.is_main:
            note(f"resuming {run_dir} from {existing.relative_to(run_dir)} (step {step:,} of {steps:,})")
    if dist.is_main:
        dropped = run_log.keep_until(run_dir, step)  # records written after the checkpoint
        if dropped:
            note(f"dropped {dropped} log record(s) written after step {step:,} (they are redone)")
        bits_max = data_bits_max(ds)
        for line in run_plan.describe(cfg, plan, params, bits_max, precision, str(device)):
            note(line)
        write_json(run_dir / "config.json", {"config": asdict(cfg), "plan": plan, "params": params,
                                             "precision": precision, "world_size": dist.world})
    warmup = plan["warmup"]
    net = dist.wrap(model)
    forward = torch.compile(net) if cfg.compile else net

    def evaluate():
        from kcap.evaluate import evaluate_capacity

        model.eval()
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            report = evaluate_capacity(lambda ids: model(ids)[0], ds, params["counted"],
                                       sample=cfg.eval_sample, seed=cfg.seed, batch_size=16,
                                       window=cfg.window, device=device)
        model.train()
        return report

    saved_step = step

    def save(at: int):
        nonlocal saved_step
        states = dist.gather(stream.state_dict())
        if dist.is_main:
            checkpoint.save(run_dir, at, model, opt, {
                "fingerprint": fingerprint, "streams": states, "cpu_threads": torch.get_num_threads(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None},
                keep=cfg.keep_checkpoints)
        dist.barrier()
        saved_step = at

    bar = tqdm(total=steps, initial=step, unit="step", disable=not (progress and dist.is_main),
               dynamic_ncols=True)
    pace = run_plan.Pace(step, steps)
    tokens_per_step = plan["batch_size"] * cfg.window
    clock, last_step = time.perf_counter(), step
    model.train()
    while step < steps:
        lr = learning_rate(step, steps, plan["lr"], warmup, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        windows = stream.next_windows(plan["batch_per_rank"])
        # The last batch of the exposures may be partial; every rank stops together once
        # any rank has nothing left (only possible when steps was set by hand, or on the
        # ragged end of data-parallel shards).
        if dist.all_min(len(windows)) == 0:
            break
        tokens = torch.from_numpy(windows.tokens.astype(np.int64)).to(device)
        x, y = tokens[:, :-1], tokens[:, 1:].clone()
        y[y == PAD_ID] = -100
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            _, loss = forward(x, y)
        if not torch.isfinite(loss).item():
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {step}; stopped. The last good checkpoint is "
                f"{checkpoint.latest(run_dir)}; try a lower lr, or bf16/fp32 instead of fp16")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        measured = pace.after_step(step) if dist.is_main else None
        if measured:
            (warn if measured[1] else note)(measured[0])
        if dist.is_main and (step % max(1, cfg.log_every) == 0 or step == steps):
            elapsed = time.perf_counter() - clock
            rate = (step - last_step) * tokens_per_step / max(elapsed, 1e-9)
            clock, last_step = time.perf_counter(), step
            run_log.append_record(run_dir, {"step": step, "loss": loss.item(), "lr": lr,
                                            "tokens": step * tokens_per_step, "tokens_per_s": rate,
                                            "exposures": stream_exposures(stream) * dist.world})
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < steps:
            if dist.is_main:
                r = evaluate()
                run_log.append_record(run_dir, {"step": step, "eval": r.to_dict()})
                bar.write(f"step {step}: {r.bits:,.0f} bits, R = {r.R:.3f} (R_max {r.R_max:.3f})"
                          + (NEGATIVE_BITS if r.bits < 0 else ""))
            dist.barrier()
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == steps:
            save(step)
    if saved_step != step:  # the data ended early: the final weights still get saved
        save(step)
    bar.close()
    with torch.no_grad():  # lets tests check that data-parallel ranks hold the same weights
        checksums = dist.gather(float(sum(p.double().sum() for p in model.parameters())))
    report = {}
    if dist.is_main:
        r = evaluate()
        run_log.append_record(run_dir, {"step": step, "eval": r.to_dict()})
        report = {"people": ds.n_people, "bits_in_data": r.bits_max,
                  "params_counted": params["counted"], "params_total": params["total"],
                  "params_active": params["active"], "bits_learned": r.bits,
                  "capacity_ratio": r.R, "capacity_ratio_max": r.R_max, "capacity_ratio_ci95": r.R_ci95,
                  "people_evaluated": r.n_evaluated, "steps": step, "planned_steps": steps,
                  "tokens": step * tokens_per_step, "precision": precision,
                  "device": str(device), "world_size": dist.world, "param_checksums": checksums,
                  "metric": r.to_dict()}
        write_json(run_dir / "report.json", report)
        from kcap.plots import plot_run
        plot_run(run_dir)
    dist.shutdown()
    return report


# Said wherever bits are printed: early in training a model's losses on the values can still
# exceed the uniform guess over the pools, which the formula counts as negative knowledge.
NEGATIVE_BITS = ("  (negative: the model's losses are still above a uniform guess over the "
                 "pools; normal early in training)")


def stream_exposures(stream) -> float:
    """Exposures per person done so far (the useful stream's, for a mixture)."""
    return getattr(stream, "useful", stream).exposures_done
