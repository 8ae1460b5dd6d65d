"""Pack throughput (issue 14): M tiny models trained as one StackedModels + StackedAdamW
against the same M models trained one after another, all in one process and run.

Why: one of the paper's tiny models cannot fill a GPU; a pack runs every layer of M models
as one batched operation. This measures what that buys. Per case (size, M) three providers,
each timed on the training step only (forward + backward + clipping + AdamW; warm-up steps
excluded; median over several repetitions, the three providers taking turns so that load
from other processes hits them alike; CUDA synchronized around each timed step):

  * pack: StackedModels + StackedAdamW, the step of kcap.pack.trainer (losses summed,
    per-model clipping and AdamW), under the solo trainer's autocast (bf16 on GPU);
  * solo loop (a), the baseline: the same M models as solo Transformers, each with the solo
    trainer's torch AdamW (kcap.run_setup._optimizer's two groups, fused on CUDA) and
    clip_grad_norm_, stepped one after another on the same batches;
  * plain loop x M (b): the simplest loop (random ids -> forward -> backward -> AdamW) on one
    model, its step time scaled by M (the same aggregate tokens/s as M such runs in a row).

Batches are random token ids made once per case, no data pipeline, logging or checkpoints,
so the ratios are about the computation alone. Tokens/s is aggregate (all M models). FLOPs
per token are counted as bench/train.py counts them (6 N with the LM head, plus 12 L d T for
attention); MFU is reported only on GPUs with a known bf16 peak. On the CPU the pack step is
also split into forward / backward / optimizer with wall-clock timers (no GPU queue to hide
work there), to account for where the time goes. A CPU ratio below 1 is no failure: the CPU
is compute-bound, and the pack's win is a GPU measurement (issue 14).
"""
from __future__ import annotations

import os
import statistics
import time

from bench.harness import Stages, environment, save
from bench.train import PEAK_BF16, flops_per_token
from kcap.atomic import write_text
from kcap.models import build_model

SIZES = ("gpt2-1-2", "gpt2-2-4", "gpt2-4-4")
LR, WEIGHT_DECAY, BETAS, EPS, MAX_NORM = 1e-3, 0.1, (0.9, 0.98), 1e-6, 1.0


def _interleaved(steps: dict, warmup: int, repeats: int, sync):
    """Seconds of each of steps' step() per repetition, the providers taking turns (a load
    swing from another process hits all of them alike), after warmup untimed rounds; and the
    pack's phase times per repetition."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times, phases = {k: [] for k in steps}, []
    for _ in range(repeats):
        for k, step in steps.items():
            sync()
            start = time.perf_counter()
            out = step()
            sync()
            times[k].append(time.perf_counter() - start)
            if k == "pack":
                phases.append(out)
    return times, phases


def _solo_optimizer(model, torch, device):
    """The solo trainer's AdamW (kcap.run_setup._optimizer): decay on ndim >= 2 only."""
    params = list({id(p): p for p in model.parameters()}.values())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=device.type == "cuda")


def _pack_step(name, vocab, m, ids, context, device, dtype, torch, mode=None):
    """The pack's training step (kcap.pack.trainer._step less its bookkeeping); it returns
    its forward / backward / optimizer wall times (meaningful without a GPU queue).
    ``mode``: None (eager), or a torch.compile mode for the forward and backward
    ("default" as the trainer's compile = true, "reduce-overhead" adds CUDA graphs)."""
    from kcap.pack import StackedAdamW, StackedModels

    torch.manual_seed(0)
    models = [build_model(name, vocab, context=context) for _ in range(m)]
    pack = StackedModels(models).to(device)
    forward = pack if mode is None else torch.compile(pack, mode=mode)
    del models
    opt = StackedAdamW(pack, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS, max_grad_norm=MAX_NORM)
    lrs = [LR] * m
    x, y = ids[..., :-1], ids[..., 1:]

    def split():
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, losses = forward(x, y)
        t1 = time.perf_counter()
        losses.sum().backward()
        t2 = time.perf_counter()
        opt.step(lrs)
        opt.zero_grad()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return split


def _solo_loop_step(name, vocab, m, ids, context, device, dtype, torch):
    """M solo models and optimizers, stepped one after another on their own batches."""
    torch.manual_seed(0)
    models = [build_model(name, vocab, context=context).to(device) for _ in range(m)]
    opts = [_solo_optimizer(model, torch, device) for model in models]

    def step():
        for i, (model, opt) in enumerate(zip(models, opts)):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(ids[i, :, :-1], ids[i, :, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _plain_step(name, vocab, ids, context, device, dtype, torch):
    """One model, the simplest loop (as bench/train.py's plain_loop)."""
    torch.manual_seed(0)
    model = build_model(name, vocab, context=context).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(ids[0, :, :-1], ids[0, :, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


DATA_N = 10_000  # people per run for the data measurement (the paper's N = 10K-50K)


def _data_seconds(m: int, batch: int, context: int) -> float:
    """Mean seconds to render one pack step's batches on one thread: M runs' bioS(DATA_N)
    training streams, ``batch`` windows each, to int64 tensors, the work each run's prefetch
    child (kcap.prefetch) does for its own stream, on a core of its own, while the step runs
    on the device. Streams render
    biographies in blocks, so the mean is taken over enough steps to cover several blocks
    (~20,000 biographies per run). A window shorter than a biography (the quick run's) is
    measured as as many tokens in 128-token windows."""
    import numpy as np
    import torch

    from kcap.run_config import DataConfig, TrainConfig
    from kcap.run_setup import build_data

    window = max(context, 128)
    batch = -(-batch * context // window)
    streams = [build_data(TrainConfig(model="gpt2-1-2", data=DataConfig(n=DATA_N, seed=i),
                                      window=window, batch_size=batch))[1] for i in range(m)]
    steps = max(3, 20_000 * 60 // (batch * (window + 1)))  # ~60 tokens per biography
    start = time.perf_counter()
    for _ in range(steps):
        for stream in streams:
            torch.from_numpy(np.asarray(stream.next_windows(batch).tokens, dtype=np.int64))
    return (time.perf_counter() - start) / steps


def _ops_per_step(step, torch) -> int:
    """Aten operations one call of ``step`` dispatches, views excluded: on a GPU about the
    kernels it launches (what a tiny model's step is bound by), counted on any device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def run(quick: bool = False, full: bool = False) -> None:
    import torch

    from kcap.data.tokenizer import default_tokenizer

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype, precision = (torch.bfloat16, "bf16") if gpu else (torch.float32, "fp32")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    vocab = default_tokenizer().vocab_size
    if quick and gpu:  # the decisive cases, in minutes of a scarce GPU session
        sizes, ms, context, batch, warmup, repeats = ("gpt2-4-4",), (1, 16), 512, 32, 3, 5
    elif quick:
        sizes, ms, context, batch, warmup, repeats = ("gpt2-1-2",), (1, 4), 32, 2, 1, 3
    elif gpu:
        sizes, ms, context, batch, warmup, repeats = SIZES, (1, 4, 16, 64), 512, 32, 3, 10
    else:  # a CPU run that finishes in minutes on 2 cores
        sizes, ms, context, batch, warmup, repeats = SIZES, (1, 4, 16), 128, 4, 2, 5
        if full:
            ms = ms + (64,)
    peak = next((v for k, v in PEAK_BF16.items() if gpu and k in torch.cuda.get_device_name()), None)
    env = environment()
    load_before = os.getloadavg()[0]

    cases = [(name, m) for name in sizes for m in ms]
    fpt = {name: flops_per_token(build_model(name, vocab, context=context), context) for name in sizes}
    # pack and solo loop cost about M steps each; the plain loop one step
    stages = Stages("pack", 2 * len(cases), weights=[fpt[n] * m * w for n, m in cases for w in (0.1, 1)])
    rows, extra = [], []
    for name, m in cases:
        case = f"{name} M={m} ctx {context} batch {batch}/model {precision}"
        tokens = m * batch * context
        torch.manual_seed(1)
        ids = torch.randint(0, vocab, (m, batch, context + 1), device=device)
        measured, split = {}, None
        try:
            stages.start(f"{case}: building pack, solo loop (a), plain loop (b)")
            steps = {"pack": _pack_step(name, vocab, m, ids, context, device, dtype, torch),
                     "solo loop (a)": _solo_loop_step(name, vocab, m, ids, context, device, dtype, torch),
                     "plain loop x M (b)": _plain_step(name, vocab, ids, context, device, dtype, torch)}
            if gpu and (m > 1 or not quick):  # "with and without": torch.compile, CUDA graphs
                for label, mode in (("pack compiled", "default"), ("pack CUDA graphs", "reduce-overhead")):
                    steps[label] = _pack_step(name, vocab, m, ids, context, device, dtype, torch, mode)
            ops = {k: _ops_per_step(steps[k], torch) for k in ("pack", "solo loop (a)")}
            data_s = _data_seconds(m, batch, context)
            stages.start(f"{case}: {warmup} warm-up + {repeats} timed steps of each, interleaved")
            times, phases = _interleaved(steps, warmup, repeats, sync)
            measured = {k: statistics.median(v) for k, v in times.items()}
            measured["plain loop x M (b)"] *= m  # M such runs one after another
            if not gpu:  # phase timers cost nothing on the CPU (no queue to hide work)
                totals = [sum(p[j] for p in phases) for j in range(3)]
                split = [t / sum(totals) for t in totals]
            del steps
        except torch.cuda.OutOfMemoryError:
            extra.append(f"- {case}: out of GPU memory; not measured")
            torch.cuda.empty_cache()
            continue
        if gpu:
            torch.cuda.empty_cache()
        for provider, seconds in measured.items():
            rate = tokens / seconds
            row = {"case": case, "provider": provider, "model": name, "m": m, "context": context,
                   "batch_per_model": batch, "median_s": seconds, "throughput": rate,
                   "unit": "tokens/s", "flops_per_token": fpt[name], "tflops": rate * fpt[name] / 1e12}
            if peak:
                row["mfu"] = rate * fpt[name] / peak
            row["repetition_s"] = [t * (m if provider == "plain loop x M (b)" else 1) for t in times[provider]]
            if provider == "pack" and split:
                row["split_forward_backward_optimizer"] = split
            if provider in ops:
                row["ops_per_step"] = ops[provider]
            if provider == "pack":  # the data pipeline's time against the step it must hide behind
                row["data_s_per_step"] = data_s
                row["data_share"] = data_s / seconds
            rows.append(row)
    stages.finish()

    load_after = os.getloadavg()[0]
    env["load_average_1min"] = {"before": load_before, "after": load_after}
    # another process on the same cores shows as load before this one starts
    shared = load_before >= 0.5 * (os.cpu_count() or 1) and not gpu
    env["note"] = (f"other processes shared the {os.cpu_count()} cores (1-min load average "
                   f"{load_before:.2f} before the run): absolute figures are low and noisy; the "
                   "ratios were measured side by side under the same load" if shared else None)
    path = save("pack", rows, baseline="solo loop (a)", env=env)
    write_text(path.with_suffix(".md"), path.with_suffix(".md").read_text() + _summary(rows, extra, env, peak))
    print(_summary(rows, extra, env, peak))


def _summary(rows: list[dict], extra: list[str], env: dict, peak) -> str:
    """Per (size, M): the pack's aggregate tokens/s, its ratios to (a) and (b), the ops each
    dispatches per step, MFU (GPU; with the compiled and CUDA-graph packs) or the split."""
    by = {(r["model"], r["m"], r["provider"]): r for r in rows}
    variants = ("pack compiled", "pack CUDA graphs") if peak else ()
    lines = ["", "## Pack vs. solo", "",
             "| size | M | batch/model | pack tokens/s | vs (a) solo loop | vs (b) plain x M | ops/step pack / (a) | data / step |"
             + "".join(f" {v} vs (a) |" for v in variants)
             + (" pack MFU | (a) MFU |" if peak else " pack forward / backward / optimizer |"),
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(variants) + ("---|" if peak else "")]

    def ratio(r, other):
        return f"{r['throughput'] / other['throughput']:.2f}x" if r and other else "-"

    for r in rows:
        if r["provider"] != "pack":
            continue
        a = by.get((r["model"], r["m"], "solo loop (a)"))
        b = by.get((r["model"], r["m"], "plain loop x M (b)"))
        ops = f"{r['ops_per_step']:,} / {a['ops_per_step']:,}" if a and "ops_per_step" in r else "-"
        data = f"{r['data_s_per_step'] * 1e3:.2f} ms = {r['data_share']:.1%}" if "data_share" in r else "-"
        cells = "".join(f" {ratio(by.get((r['model'], r['m'], v)), a)} |" for v in variants)
        if peak:
            tail = f" {r['mfu']:.1%} | {a['mfu']:.1%} |" if a else f" {r['mfu']:.1%} | - |"
        else:
            sp = r.get("split_forward_backward_optimizer")
            tail = f" {sp[0]:.0%} / {sp[1]:.0%} / {sp[2]:.0%} |" if sp else " - |"
        lines.append(f"| {r['model']} | {r['m']} | {r['batch_per_model']} | {r['throughput']:,.0f} | "
                     f"{ratio(r, a)} | {ratio(r, b)} | {ops} | {data} |" + cells + tail)
    lines += [""] + extra
    if not peak:
        lines.append("- MFU: not reported (no GPU with a known bf16 peak).")
    if env.get("note"):
        lines.append(f"- note: {env['note']}.")
    lines.append("- timed: the training step only (forward + backward + clipping + AdamW) on random "
                 "token batches, warm-up excluded, median of the repetitions; tokens/s aggregate over M.")
    lines.append(f"- data / step: one thread rendering the pack's M batches from bioS({DATA_N:,}) "
                 "training streams, mean over ~20,000 biographies per run (what the runs' prefetch children do "
                 "while the device computes, one child per run, so split over M cores where there are M), "
                 "and its share of the pack's step time: below 100% it hides behind the step even on one core.")
    lines.append("- ops/step: aten operations one step dispatches, views excluded (on a GPU about its "
                 "kernel launches); the solo loop's are its M models' together. _foreach_norm and "
                 "the fused AdamW count as one op each (on the CPU they loop inside; there torch's "
                 "AdamW is its per-tensor loop, not fused).")
    return "\n".join(lines) + "\n"
