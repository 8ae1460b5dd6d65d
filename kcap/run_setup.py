"""What the solo trainer (kcap.train) and the pack trainer (kcap.pack.trainer) share: one
run's setup and bookkeeping, so that a run folder looks the same whichever trained it.

``open_run`` does everything before the first step (plan, data, model init under the
run's seed, optimizer, resume from the newest intact checkpoint, log cut back to it,
config.json) and returns a ``Run``; its methods are the jobs around the steps: ``save``
(a checkpoint in the solo format), ``evaluate``, ``log_step`` / ``log_eval`` (log.jsonl
records) and ``finish`` (final evaluation, report.json, training.png). The step itself
belongs to each trainer: one model (kcap.train) or M stacked ones (kcap.pack.trainer).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from kcap import checkpoint, run_log, run_plan
from kcap.budget import count_tokens, paper_recipe, steps_for
from kcap.console import note, warn
from kcap.run_config import TrainConfig


class TrainingDiverged(RuntimeError):
    pass


def build_data(cfg: TrainConfig, rank: int = 0, world: int = 1, labels: bool = False):
    """(dataset, training stream, useful fraction of windows) of a config."""
    from kcap.data.biod import BioD, BioDConfig
    from kcap.data.bios import BioS, BioSConfig
    from kcap.data.qa_mixed import trained_data
    from kcap.data.stream import ExposureStream, MixtureStream

    d = cfg.data
    if d.kind == "bioS":
        ds = BioS(BioSConfig(n=d.n, seed=d.seed, variant=d.variant, marker=d.marker))
    elif d.kind == "bioD":
        ds = BioD(BioDConfig(n=d.n, k=d.k, c=d.c, d=d.d, l=d.l, t=d.t, seed=d.seed))
    elif d.kind == "bioR":
        from kcap.data.bior import BioR

        ds = BioR.load(d.bior, n=d.n, seed=d.seed)
    else:
        raise ValueError(f"data.kind must be bioS, bioD or bioR, got {d.kind!r}")
    # with qa_fraction, the QA-half's pairs follow their biographies (Part 3.1's mixed training)
    trained = trained_data(ds, d.qa_fraction, d.seed)
    useful = ExposureStream(trained, cfg.exposures, cfg.window + 1, d.seed, rank, world, labels)
    if not d.junk_n:
        return ds, useful, 1.0
    if d.kind != "bioS":
        raise ValueError("junk mixtures are defined for bioS")
    junk = BioS(BioSConfig(n=d.junk_n, seed=d.seed, person_offset=d.n))
    stream = MixtureStream(useful, ExposureStream(junk, None, cfg.window + 1, d.seed, rank, world,
                                                  labels), d.junk_ratio, d.seed)
    return ds, stream, d.junk_ratio[0] / sum(d.junk_ratio)


def trained_token_ids(stream):
    """Sorted token ids the training data can emit (the useful data set's, QA blocks of
    mixed training included): the vocabulary rows counted as parameters."""
    return getattr(stream, "useful", stream).dataset.used_token_ids()


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
    if d["data"]["qa_fraction"] == 0.0:  # a newer key: older runs resume
        d["data"].pop("qa_fraction")
    # where an import lies is not what it holds: the data streams' states carry its digest
    d["data"].pop("bior")
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



# Said wherever bits are printed: early in training a model's losses on the values can still
# exceed the uniform guess over the pools, which the formula counts as negative knowledge.
NEGATIVE_BITS = ("  (negative: the model's losses are still above a uniform guess over the "
                 "pools; normal early in training)")


def stream_exposures(stream) -> float:
    """Exposures per person done so far (the useful stream's, for a mixture)."""
    return getattr(stream, "useful", stream).exposures_done


class FiniteWatch:
    """Records, on the device, the first step whose loss is not finite, so that a step never
    waits for the GPU to say so (reading a loss is a host synchronisation); the trainers
    read it where they synchronise anyway (logging) and before anything is written
    (evaluations, checkpoints), so no checkpoint ever holds weights past a bad loss."""

    def __init__(self, device, models: int | None = None):
        import torch

        shape = () if models is None else (models,)
        self.step = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.value = torch.zeros(shape, dtype=torch.float32, device=device)

    def update(self, loss, step, active=None) -> None:
        """``loss``: a scalar (or (M,) per model); ``step``: the step index (or (M,) tensor);
        ``active``: (M,) bool, models whose loss counts."""
        import torch

        loss = loss.detach().float()
        new = (self.step < 0) & ~torch.isfinite(loss)
        if active is not None:
            new &= active
        self.step = torch.where(new, step, self.step)
        self.value = torch.where(new, loss, self.value)

    def check(self, error) -> None:
        """Raise ``error(step, value)`` (index i too, per model: ``error(i, step, value)``)
        for the first non-finite loss seen."""
        steps = self.step.tolist()
        if isinstance(steps, int):
            if steps >= 0:
                raise error(steps, self.value.item())
            return
        for i, at in enumerate(steps):
            if at >= 0:
                raise error(i, at, self.value[i].item())


@dataclass
class Run:
    """One run being trained: its config and plan, data, solo model and optimizer (what
    checkpoints are written from and evaluations run on), and where it stands.

    ``step``: steps done; ``saved_step``: the step of the newest checkpoint written or
    resumed from. ``precision`` is "fp32", "bf16" or "fp16" (``dtype`` the matching torch
    dtype); ``dist`` is kcap.distributed.Dist (single-process for a pack)."""
    cfg: TrainConfig
    run_dir: Path
    dist: object
    plan: dict
    ds: object
    stream: object
    model: object
    opt: object
    scaler: object
    params: dict
    fingerprint: dict
    step: int
    saved_step: int
    precision: str
    dtype: object
    device: object

    @property
    def steps(self) -> int:
        """The planned number of steps."""
        return self.plan["steps"]

    @property
    def tokens_per_step(self) -> int:
        """Input tokens of one (full) step over all ranks: batch_size * window."""
        return self.plan["batch_size"] * self.cfg.window

    def autocast(self):
        """The mixed-precision context of this run's forward passes (off in fp32)."""
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.precision != "fp32")

    def evaluate(self):
        """The capacity evaluation of ``self.model`` as it is now (a kcap.evaluate report)."""
        from kcap.evaluate import evaluate_capacity

        self.model.eval()
        with self.autocast():
            report = evaluate_capacity(lambda ids: self.model(ids)[0], self.ds, self.params["counted"],
                                       sample=self.cfg.eval_sample, seed=self.cfg.seed, batch_size=16,
                                       window=self.cfg.window, device=self.device)
        self.model.train()
        return report

    def save(self, at: int) -> None:
        """Checkpoint ``self.model`` and ``self.opt`` as step ``at`` (every rank calls it)."""
        import torch

        states = self.dist.gather(self.stream.state_dict())
        if self.dist.is_main:
            checkpoint.save(self.run_dir, at, self.model, self.opt, {
                "fingerprint": self.fingerprint, "streams": states,
                "cpu_threads": torch.get_num_threads(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None},
                keep=self.cfg.keep_checkpoints)
        self.dist.barrier()
        self.saved_step = at

    def log_step(self, loss: float, lr: float, rate: float) -> None:
        """Append the training record of step ``self.step`` (main rank only)."""
        run_log.append_record(self.run_dir, {
            "step": self.step, "loss": loss, "lr": lr, "tokens": self.step * self.tokens_per_step,
            "tokens_per_s": rate, "exposures": stream_exposures(self.stream) * self.dist.world})

    def log_eval(self, r) -> str:
        """Append evaluation ``r`` as the record of step ``self.step``; return its summary line."""
        run_log.append_record(self.run_dir, {"step": self.step, "eval": r.to_dict()})
        return (f"step {self.step}: {r.bits:,.0f} bits, R = {r.R:.3f} (R_max {r.R_max:.3f})"
                + (NEGATIVE_BITS if r.bits < 0 else ""))

    def finish(self) -> dict:
        """Final evaluation, report.json and training.png (main rank); return the report
        ({} on other ranks). Every rank calls it: the weight checksums are gathered."""
        import torch

        from kcap.atomic import write_json

        with torch.no_grad():  # lets tests check that data-parallel ranks hold the same weights
            checksums = self.dist.gather(float(sum(p.double().sum() for p in self.model.parameters())))
        if not self.dist.is_main:
            return {}
        r = self.evaluate()
        self.log_eval(r)
        params = self.params
        report = {"people": self.ds.n_people, "bits_in_data": r.bits_max,
                  "params_counted": params["counted"], "params_total": params["total"],
                  "params_active": params["active"], "bits_learned": r.bits,
                  "capacity_ratio": r.R, "capacity_ratio_max": r.R_max, "capacity_ratio_ci95": r.R_ci95,
                  "people_evaluated": r.n_evaluated, "steps": self.step, "planned_steps": self.steps,
                  "tokens": self.step * self.tokens_per_step, "precision": self.precision,
                  "device": str(self.device), "world_size": self.dist.world, "param_checksums": checksums,
                  "metric": r.to_dict()}
        write_json(self.run_dir / "report.json", report)
        from kcap.plots import plot_run
        plot_run(self.run_dir)
        return report


def run_precision(cfg: TrainConfig, device) -> tuple[str, object]:
    """(precision name, torch dtype) of a run on ``device``: "auto" is bf16 on CUDA, fp32
    otherwise; anything but fp32 on CPU is refused."""
    import torch

    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if precision != "fp32" and device.type == "cpu":
        raise ValueError(f"precision {precision!r} needs a GPU; use fp32 on CPU")
    return precision, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def open_run(cfg: TrainConfig, run_dir: Path, resume: bool, dist) -> Run:
    """Everything before a run's first step (see the module docstring). The caller holds the
    run folder's lock. The model is built under ``torch.manual_seed(cfg.seed)``, so a run's
    initial weights are its own whatever else the process builds."""
    import torch

    from kcap.atomic import write_json
    from kcap.capacity import data_bits_max
    from kcap.models import build_model, parameter_report

    device = dist.device(cfg.device)
    precision, dtype = run_precision(cfg, device)
    plan = resolve(cfg, dist.world)
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
    params = parameter_report(model, trained_token_ids(stream))
    fingerprint = _fingerprint(cfg)
    step = 0
    if existing is not None:
        meta = _load_checkpoint(existing, model, opt, stream, fingerprint, dist)
        step = meta["step"]
        _resume_threads(meta.get("cpu_threads"), device)
        if dist.is_main:
            note(f"resuming {run_dir} from {existing.relative_to(run_dir)} "
                 f"(step {step:,} of {plan['steps']:,})")
    if dist.is_main:
        dropped = run_log.keep_until(run_dir, step)  # records written after the checkpoint
        if dropped:
            note(f"dropped {dropped} log record(s) written after step {step:,} (they are redone)")
        bits_max = data_bits_max(ds)
        for line in run_plan.describe(cfg, plan, params, bits_max, precision, str(device)):
            note(line)
        write_json(run_dir / "config.json", {"config": asdict(cfg), "plan": plan, "params": params,
                                             "precision": precision, "world_size": dist.world})
    return Run(cfg=cfg, run_dir=run_dir, dist=dist, plan=plan, ds=ds, stream=stream, model=model,
               opt=opt, scaler=scaler, params=params, fingerprint=fingerprint, step=step,
               saved_step=step, precision=precision, dtype=dtype, device=device)


def _load_checkpoint(path: Path, model, opt, stream, fingerprint: dict, dist) -> dict:
    """Load checkpoint ``path`` into the model, optimizer and this rank's stream after
    checking that it belongs to this configuration; return its state (step, cpu_threads...)."""
    meta = checkpoint.load(path, model, opt)
    if meta.get("fingerprint") != fingerprint:
        raise checkpoint.CheckpointError(
            f"{path} belongs to another configuration; differing keys: "
            f"{sorted(k for k in fingerprint if meta.get('fingerprint', {}).get(k) != fingerprint[k])}")
    if len(meta["streams"]) != dist.world:
        raise checkpoint.CheckpointError(f"{path} was written by {len(meta['streams'])} ranks, "
                                         f"this run has {dist.world}")
    stream.load_state_dict(meta["streams"][dist.rank])
    return meta
