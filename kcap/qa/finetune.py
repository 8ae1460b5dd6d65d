"""``kcap qa RUN``: LoRA fine-tuning on the QA pairs of half the people, scored on the other.

Part 3.1's extraction test, as Part 3.3's appendix applies it to capacity: the pretrained
model gets LoRA adapters (kcap.lora; rank 16, alpha 32 on the attention query, the value
rows and the MLP by default, within Part 3.1's rank 8-32), its base frozen, and is
fine-tuned on every attribute's question for the fine-tuning half of the people
(kcap.data.qa.qa_halves), the loss on the answer's tokens and the period closing it (the
period is what tells greedy decoding where the answer ends, so exact match can require it).
The test half, which no fine-tuning or mixed pretraining ever showed as QA, is then asked
every question: greedy exact match, first-token accuracy and the answers' losses, from which
kcap.qa.report computes the extractable bits.

The fine-tune is resumable like training: ``<folder>/qa/`` holds its checkpoints (adapters
and optimizer), config and log; the result is ``<folder>/qa_report.json``. ``<folder>`` is
the run folder (or a quantized model's folder: adapters then train beside the int weights).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kcap.field_types import check_fields

QA_FOLDER, REPORT_NAME = "qa", "qa_report.json"


@dataclass
class QAConfig:
    rank: int = 16
    alpha: float = 32.0
    where: tuple[str, ...] = ("q", "v", "mlp")
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 10             # passes over the fine-tuning half's pairs
    batch_size: int = 16         # QA pairs per step
    test_people: int | None = 2000  # people of the test half asked (None: all)
    seed: int = 0                # adapters' init, batch order, test sample
    log_every: int = 20
    checkpoint_every: int = 500

    def __post_init__(self):
        from kcap.data.arguments import check_int
        from kcap.lora import WHERE

        check_fields(self, "qa")
        for name in ("rank", "epochs", "batch_size", "log_every", "checkpoint_every"):
            check_int(name, getattr(self, name), 1)
        if self.test_people is not None:
            check_int("test_people", self.test_people, 1)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if not self.alpha > 0 or not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"alpha and lr must be > 0 and weight_decay >= 0, got alpha "
                             f"{self.alpha}, lr {self.lr}, weight_decay {self.weight_decay}")
        if not self.where or set(self.where) - set(WHERE) or len(set(self.where)) < len(self.where):
            raise ValueError(f"where must name distinct parts among {WHERE}, got {list(self.where)}")

    def record(self) -> dict:
        """The options as qa_report.json holds them (JSON types: lists, not tuples)."""
        return json.loads(json.dumps(asdict(self)))

    def fingerprint(self) -> dict:
        """What a checkpoint must agree with to be resumed."""
        d = self.record()
        for key in ("log_every", "checkpoint_every", "test_people"):
            d.pop(key)
        return d


def output_folder(path) -> Path:
    """Where a model's QA work goes: its run folder, or the quantized model's folder."""
    from kcap.evaluate_checkpoint import checkpoint_folder

    path = Path(path)
    if (path / "quantized.json").is_file() and not (path / "checkpoints").is_dir():
        return path
    return checkpoint_folder(path).parent.parent


def run_qa(path, cfg: QAConfig | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Fine-tune and score the model at ``path`` (a run, checkpoint or quantized folder);
    write and return qa_report.json's content. Resumes an interrupted fine-tune; a finished
    one with the same configuration is returned as it is."""
    from kcap.run_lock import run_lock

    cfg = cfg or QAConfig()
    if not isinstance(cfg, QAConfig):
        raise TypeError(f"cfg must be a QAConfig, got {type(cfg).__name__}")
    out = output_folder(path)
    report_path = out / REPORT_NAME
    with run_lock(out, "qa"):
        if report_path.is_file():
            done = json.loads(report_path.read_text())
            asked = cfg.record()
            if done.get("qa_config") == asked:
                return done
            differ = sorted(k for k in asked if (done.get("qa_config") or {}).get(k) != asked[k])
            raise ValueError(f"{report_path} was made with other options (differing: "
                             f"{', '.join(differ)}); delete it and {out / QA_FOLDER} to redo the "
                             "test with these")
        return _run(path, out, cfg, device, progress)


def _run(path, out: Path, cfg: QAConfig, device: str, progress: bool) -> dict:
    import torch

    from kcap.atomic import write_json
    from kcap.data.qa import QA_KINDS, qa_halves, qa_pairs
    from kcap.evaluate import person_losses
    from kcap.evaluate_checkpoint import load_run
    from kcap.lora import add_lora
    from kcap.qa.answers import encode_pairs, score_answers
    from kcap.qa.report import build_report
    from kcap.run_setup import run_precision

    run_cfg, ds, model, info = load_run(path, device)
    if ds.kind not in QA_KINDS:
        raise ValueError(f"QA pairs are defined for bioS and bioR people; this model was trained "
                         f"on {ds.kind}")
    dev = next(iter(model.buffers()), next(model.parameters())).device
    precision, dtype = run_precision(run_cfg, dev)
    if precision == "fp16":
        precision, dtype = "bf16", torch.bfloat16  # adapters train without a loss scaler

    def autocast():
        return torch.autocast(dev.type, dtype=dtype, enabled=precision != "fp32")

    tune, test = qa_halves(ds.n_people, run_cfg.data.seed)
    if len(tune) < 1 or len(test) < 1:
        raise ValueError(f"QA needs at least 2 people (one to fine-tune on, one to test), got "
                         f"{ds.n_people}")
    test = _sample(test, cfg.test_people, cfg.seed)
    attributes = tuple(a.name for a in ds.attributes if a.name != "gender")
    forward = lambda ids: model(ids)[0]  # noqa: E731
    model.eval()
    with autocast():  # what the model stores, on the people that will be tested
        stored = person_losses(forward, ds, test, batch_size=16, window=run_cfg.window, device=dev,
                               progress=progress)
    torch.manual_seed(cfg.seed)
    adapted = add_lora(model, cfg.rank, cfg.alpha, cfg.where)
    train = encode_pairs(ds.tokenizer, qa_pairs(ds, tune, attributes), attributes)
    _finetune(model, train, cfg, out / QA_FOLDER, dev, autocast, progress)

    model.eval()
    test_qa = encode_pairs(ds.tokenizer, qa_pairs(ds, test, attributes), attributes)
    scores = score_answers(forward, test_qa, device=dev, progress=progress, autocast=autocast)
    seen = train.rows(_sample(np.arange(len(train)), len(test_qa), cfg.seed))
    seen_scores = score_answers(forward, seen, device=dev, autocast=autocast)
    report = build_report(ds, stored, test_qa, scores, seen, seen_scores, info["params_counted"])
    report.update(qa_config=cfg.record(), adapted=adapted,
                  people={"fine_tuned": int(len(tune)), "test_half": int(ds.n_people - len(tune)),
                          "tested": int(len(test))},
                  mixed_pretraining=run_cfg.data.qa_fraction, precision=precision,
                  device=str(dev), source=str(Path(path).resolve()))
    report = json.loads(json.dumps(report))  # as the file reads back (lists, not tuples)
    write_json(out / REPORT_NAME, report)
    return report


def _sample(people: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    """A keyed sample of ``count`` of ``people`` (all of them if None or more), sorted."""
    from kcap.data import counter_rng as rng

    if count is None or count >= len(people):
        return people
    pick = rng.permute(rng.stream_key(seed, "qa/test-sample"), len(people), np.arange(count))
    return np.sort(people[pick])


def _finetune(model, train, cfg: QAConfig, folder: Path, dev, autocast, progress: bool) -> None:
    """Train the adapters on ``train`` (QATokens) for cfg.epochs, resuming from ``folder``."""
    import torch
    from tqdm.auto import tqdm

    from kcap import checkpoint, run_log
    from kcap.atomic import write_json
    from kcap.budget import learning_rate
    from kcap.console import note
    from kcap.data import counter_rng as rng
    from kcap.lora import lora_parameters
    from kcap.qa.answers import qa_loss

    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    weights = _adapter_module(model)
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    steps, warmup = cfg.epochs * per_epoch, max(1, cfg.epochs * per_epoch // 20)
    fingerprint = {**cfg.fingerprint(), "pairs": len(train)}
    step = 0
    good = checkpoint.newest_good(folder, lambda p, err: note(f"{err}; using an older checkpoint"))
    if good is not None:
        meta = checkpoint.load(good, weights, opt)
        if meta.get("fingerprint") != fingerprint:
            raise ValueError(f"{folder} holds a QA fine-tune of another configuration "
                             f"({meta.get('fingerprint')}); delete that folder to start afresh")
        step = meta["step"]
        run_log.keep_until(folder, step)
        note(f"resuming the QA fine-tune from step {step:,} of {steps:,}")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", {"qa_config": fingerprint, "steps": steps})
    key, targets = rng.stream_key(cfg.seed, "qa/batches"), train.targets()
    model.train()
    bar = tqdm(total=steps, initial=step, desc="QA fine-tune", unit="step", disable=not progress,
               dynamic_ncols=True)
    while step < steps:
        epoch, j = divmod(step, per_epoch)
        lo, hi = j * cfg.batch_size, min((j + 1) * cfg.batch_size, len(train))
        index = rng.permute(key, len(train), np.arange(lo, hi), epoch)
        part = train.rows(index)
        x = torch.from_numpy(part.tokens).to(dev)
        mask = torch.from_numpy(targets[index][:, :x.shape[1]]).to(dev)
        lr = learning_rate(step, steps, cfg.lr, warmup, 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast():
            loss = qa_loss(model(x)[0], x, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == steps:
            value = loss.item()
            if not math.isfinite(value):
                raise RuntimeError(f"QA fine-tune loss is {value} at step {step}; try a lower --lr")
            run_log.append_record(folder, {"step": step, "loss": value, "lr": lr})
            bar.set_postfix(loss=f"{value:.3f}")
        if step % cfg.checkpoint_every == 0 or step == steps:
            checkpoint.save(folder, step, weights, opt, {"fingerprint": fingerprint}, keep=1)
    bar.close()


def _adapter_module(model):
    """The adapters' parameters as one module: what QA checkpoints hold (the base weights
    stay as the run saved them)."""
    import torch.nn as nn

    from kcap.lora import adapters

    holder = nn.Module()
    for i, m in enumerate(adapters(model)):
        holder.register_parameter(f"a{i}", m.a)
        holder.register_parameter(f"b{i}", m.b)
    return holder
