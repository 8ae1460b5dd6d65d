"""Trainer throughput: kcap's trainer against a minimal plain-PyTorch loop on the same model.

Both run the same architecture, batch and context in the same process. The plain loop feeds
random tokens (no data stream, no logging, no checkpoints), so the ratio shows what the
trainer's machinery costs. FLOPs per token follow the PaLM appendix: 6 N (N the non-embedding
parameters, plus the LM head) + 12 L d T for attention; MFU is reported on GPUs with a known
peak (H100 bf16 dense: 989 TFLOP/s), not on CPUs.
"""
from __future__ import annotations

import statistics
import tempfile
import time

from bench.harness import Stages, save
from kcap.models import build_model
from kcap.train import DataConfig, TrainConfig, read_log, train

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(model, context: int) -> float:
    cfg = model.cfg
    embedding = cfg.vocab_size * cfg.d_model
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - embedding
    if cfg.tied:
        n += embedding  # the LM head's matmul is real work even when its weight is shared
    return 6 * n + 12 * cfg.n_layer * cfg.d_model * context


def plain_loop(model_name: str, vocab: int, batch: int, context: int, steps: int, device, dtype) -> float:
    """Tokens/s of the simplest loop: random ids -> forward -> backward -> AdamW."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    model = build_model(model_name, vocab, context=context).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    ids = torch.randint(0, vocab, (batch, context + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    # a bar, since a CPU case runs for minutes; its updates cost microseconds against steps of
    # milliseconds
    for _ in tqdm(range(steps), desc="plain loop steps", leave=False, mininterval=1.0):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch * context / (time.perf_counter() - start)


def kcap_trainer(model_name: str, n: int, batch: int, context: int, steps: int, precision: str) -> float:
    """Median tokens/s the trainer logged (the first log interval, with warm-up, dropped)."""
    cfg = TrainConfig(model=model_name, data=DataConfig(n=n, variant="online"), exposures=1000,
                      window=context, batch_size=batch, steps=steps, log_every=max(1, steps // 10),
                      checkpoint_every=0, eval_sample=50, precision=precision)
    with tempfile.TemporaryDirectory() as run:
        train(cfg, run, progress=True)  # the trainer's own bar shows the steps
        rates = [r["tokens_per_s"] for r in read_log(run) if "tokens_per_s" in r][1:]
    return statistics.median(rates)


def run(quick: bool = False) -> None:
    import torch

    from kcap.data.tokenizer import default_tokenizer

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype, precision = (torch.bfloat16, "bf16") if gpu else (torch.float32, "fp32")
    vocab = default_tokenizer().vocab_size
    if gpu:
        cases = [("gpt2-1-1", 64, 512, 200), ("gpt2-12-12", 32, 512, 60)]
    else:
        cases = [("gpt2-1-1", 8, 128, 40 if quick else 200), ("gpt2-2-4", 8, 512, 6 if quick else 30)]
    peak = next((v for k, v in PEAK_BF16.items() if gpu and k in torch.cuda.get_device_name()), None)
    rows = []
    flops = [flops_per_token(build_model(name, vocab, context=context), context)
             for name, _, context, _ in cases]
    stages = Stages("train", 2 * len(cases), weights=[fpt * batch * context * steps
                                                      for fpt, (_, batch, context, steps) in
                                                      zip(flops, cases) for _ in range(2)])
    for fpt, (name, batch, context, steps) in zip(flops, cases):
        case = f"{name} ctx {context} batch {batch} {precision}"
        measured = []
        stages.start(f"{case}: plain PyTorch loop, {steps} steps")
        measured.append(("plain PyTorch loop", plain_loop(name, vocab, batch, context, steps, device, dtype)))
        stages.start(f"{case}: kcap trainer, {steps} steps")
        measured.append(("kcap trainer", kcap_trainer(name, 10_000, batch, context, steps, precision)))
        for provider, rate in measured:
            row = {"case": case, "provider": provider, "median_s": batch * context / rate,
                   "throughput": rate, "unit": "tokens/s", "tflops": rate * fpt / 1e12}
            if peak:
                row["mfu"] = rate * fpt / peak
            rows.append(row)
    stages.finish()
    save("train", rows, baseline="plain PyTorch loop")
