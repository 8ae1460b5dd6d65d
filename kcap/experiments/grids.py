"""Building blocks of the experiments' grids: one run per (model, data, exposures), with the
settings of each preset, and what a grid costs before it runs.

Presets:
  smoke  CPU, minutes per experiment: tiny models (gpt2-1-x) on a few hundred people for a
         few exposures, context 128. It exercises every moving part, not the science.
  gpu    one H100: the paper's recipes (lr, weight decay and batch for N) at N = 10K-50K.
  paper  the paper's grids and recipes (up to N = 10M), for a cluster.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from kcap.experiments.spec import PostStep, Run
from kcap.run_config import DataConfig, TrainConfig

# Per-preset settings that are not the science: context, evaluation, checkpoints.
_PRESET_SETTINGS = {
    "smoke": dict(window=128, batch_size=4, lr=5e-3, eval_sample=None, log_every=10,
                  checkpoint_every=50, keep_checkpoints=1),
    "gpu": dict(window=512, recipe="paper", precision="bf16", eval_sample=4000, log_every=100,
                checkpoint_every=2000),
    "paper": dict(window=512, recipe="paper", precision="bf16", eval_sample=20_000,
                  log_every=200, checkpoint_every=5000),
}
# Exposures stand-ins of the smoke preset: the paper's 100 / 300 / 600 / 1000 scaled down so
# that a CPU run takes seconds; their order is kept. (From ~20 exposures at batch 4 a tiny
# model's bits turn positive: fewer would draw nothing on the figures' log axes.)
SMOKE_EXPOSURES = {100: 12, 300: 16, 600: 20, 1000: 24}
# bioS biographies average ~61 kcap tokens (docs/science.md, section 3).
TOKENS_PER_BIO = 61.0
# A mixed person's QA block (data.qa_fraction, kcap.data.qa_mixed) averages ~96 tokens
# (measured over 25,000 people of bioS(50,000)); it follows each of that person's exposures.
QA_TOKENS_PER_PERSON = 96.0


def exposures_for(preset: str, paper_exposures: int) -> int:
    return SMOKE_EXPOSURES.get(paper_exposures, paper_exposures) if preset == "smoke" else paper_exposures


def run(preset: str, model: str, n: int, exposures: int, *, name: str | None = None,
        labels: dict | None = None, post=(), model_options: dict | None = None, **data) -> Run:
    """A Run of ``model`` on data ``DataConfig(n=n, **data)`` for ``exposures`` (the paper's
    number: the smoke preset scales it down), with the preset's settings."""
    if preset not in _PRESET_SETTINGS:
        raise ValueError(f"preset must be one of {sorted(_PRESET_SETTINGS)}, got {preset!r}")
    settings = dict(_PRESET_SETTINGS[preset])
    if "lr" in data:  # an lr sweep overrides the recipe's lr
        settings["lr"] = data.pop("lr")
        settings.pop("recipe", None)
    cfg = TrainConfig(model=model, model_options=dict(model_options or {}),
                      data=DataConfig(n=n, **data), exposures=exposures_for(preset, exposures),
                      **settings)
    size = model.split("-", 1)[1]
    base = {"model": model, "arch": model.split("-")[0], "size": size, "n": n,
            "exposures": exposures}
    if data.get("kind", "bioS") == "bioS":
        base["variant"] = cfg.data.variant
    base.update(labels or {})
    return Run(name or default_name(base), cfg, base, tuple(post))


def default_name(labels: dict) -> str:
    parts = [labels["model"], f"n{short(labels['n'])}", f"e{labels['exposures']}"]
    parts += [f"{k}{short(v) if isinstance(v, int) else v}" for k, v in labels.items()
              if k not in ("model", "arch", "size", "n", "exposures", "variant")]
    return "-".join(str(p).replace(" ", "_").lower() for p in parts)


def short(n: int) -> str:
    for unit, size in (("m", 10**6), ("k", 10**3)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def with_lrs(runs: list[Run], lrs: tuple[float, ...]) -> list[Run]:
    """Each run once per learning rate (labels gain "lr"): the best of them is reported."""
    out = []
    for r in runs:
        for lr in lrs:
            cfg = replace(r.config, lr=lr, recipe=None)
            if r.config.recipe == "paper":  # keep the recipe's batch and weight decay
                from kcap.budget import paper_recipe
                rec = paper_recipe(r.config.data.n, r.config.exposures, r.config.data.kind)
                cfg = replace(cfg, batch_size=rec["batch_size"], weight_decay=rec["weight_decay"])
            labels = {**r.labels, "lr": lr}
            out.append(Run(f"{r.name}-lr{lr:g}", cfg, labels, r.post))
    return out


QUANTIZE = (PostStep("int8-rtn", "quantize", {"bits": 8, "method": "rtn", "group_size": 64}),
            PostStep("int8-gptq", "quantize", {"bits": 8, "method": "gptq", "group_size": 64}),
            PostStep("int4-rtn", "quantize", {"bits": 4, "method": "rtn", "group_size": 64}),
            PostStep("int4-gptq", "quantize", {"bits": 4, "method": "gptq", "group_size": 64}))


# --- what a run holds and costs, before it runs --------------------------------------------

@functools.lru_cache(maxsize=64)
def _used_tokens(kind: str, n: int, variant: str, marker: bool, qa_fraction: float = 0.0,
                 seed: int = 0) -> int:
    """Token ids a bioS run's data uses (its embedding rows that count as parameters), QA
    blocks included when some people's QA pairs are mixed in; 0 for other kinds. Exact up
    to 50,000 people (the seed picks which names and values occur)."""
    from kcap.data.bios import BioS, BioSConfig
    from kcap.data.qa_mixed import trained_data

    if kind != "bioS":
        return 0
    # beyond ~50K people every name part and value is in use: the count stops growing
    ds = BioS(BioSConfig(n=min(n, 50_000), seed=seed, variant=variant, marker=marker))
    return len(trained_data(ds, qa_fraction, seed).used_token_ids())


@functools.lru_cache(maxsize=8)
def _bior_facts(folder: str, n: int, seed: int, qa_fraction: float = 0.0) -> tuple[float, int, float]:
    """(bits in the data, token ids used, mean tokens per rewrite) of a bioR import; the ids
    include the QA blocks of a run that mixes them in."""
    from kcap.capacity import data_bits_max
    from kcap.data.bior import BioR, read_meta
    from kcap.data.qa_mixed import trained_data

    ds, meta = BioR.load(folder, n=n, seed=seed), read_meta(folder)
    used = trained_data(ds, qa_fraction, seed).used_token_ids()
    return data_bits_max(ds), len(used), meta["tokens"] / meta["records"]


def bior_runs(preset: str, folder, sizes) -> list[Run]:
    """Runs on a bioR import (r2's bioR row): each GPT2 size at the import's N, 1000
    exposures, labelled variant "bioR"."""
    from kcap.data.bior import read_meta

    meta = read_meta(folder)
    folder = str(Path(folder).resolve())
    return [run(preset, f"gpt2-{s}", meta["n"], 1000, name=f"gpt2-{s}-bior-n{short(meta['n'])}-e1000",
                labels={"variant": "bioR"}, kind="bioR", bior=folder, seed=meta["seed"])
            for s in sizes]


@functools.lru_cache(maxsize=256)
def _param_counts(model: str, options: tuple, used: int, vocab: int) -> tuple[int, int]:
    """(counted, total) parameters, from a model built on the meta device (no memory)."""
    import torch

    from kcap.capacity import count_params
    from kcap.models import build_model

    with torch.device("meta"):
        m = build_model(model, vocab, **dict(options))
    total = sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    return count_params(m, range(used), vocab) if used else total, total


def run_facts(r: Run) -> dict:
    """Counted and total parameters, the bits the data holds, R_max and the training tokens
    of a run, estimated without generating its data (tokens from ~61 per biography and ~96
    per mixed person's QA block)."""
    from kcap.capacity import biod_bits_max, data_bits_max
    from kcap.data.bios import BioS, BioSConfig
    from kcap.data.pools import N_FULL_NAMES
    from kcap.data.tokenizer import default_tokenizer

    cfg, d = r.config, r.config.data
    vocab = default_tokenizer().vocab_size
    used = _used_tokens(d.kind, d.n, d.variant, d.marker, d.qa_fraction, d.seed)
    counted, total = _param_counts(cfg.model, tuple(sorted(cfg.model_options.items())),
                                   used or vocab, vocab)
    if d.kind == "bioS":  # a BioS is cheap to build: profiles are drawn only when asked for
        bits = data_bits_max(BioS(BioSConfig(n=d.n, variant=d.variant, marker=d.marker)))
        per_bio = TOKENS_PER_BIO
    elif d.kind == "bioR":
        bits, used, per_bio = _bior_facts(d.bior, d.n, d.seed, d.qa_fraction)
        counted, total = _param_counts(cfg.model, tuple(sorted(cfg.model_options.items())),
                                       used, vocab)
    else:
        bits = biod_bits_max(d.n, N_FULL_NAMES, d.k, d.c, d.d, d.l, d.t)
        per_bio = 4 + d.k * (6 + d.c * (d.l + 1))  # name, then "'s ID k is" and the chunks
    # bioD has no QA (DataConfig refuses qa_fraction there)
    useful = d.n * cfg.exposures * per_bio + int(d.qa_fraction * d.n) * cfg.exposures * QA_TOKENS_PER_PERSON
    junk = useful * d.junk_ratio[1] / d.junk_ratio[0] if d.junk_n else 0
    return {"params": counted, "params_total": total, "bits_max": bits, "R_max": bits / counted,
            "tokens": int(useful + junk)}


# Throughput model for the estimates (measured, see bench/results/):
# - CPU: gpt2-1-1 (328K params) trains at ~30K tokens/s on 2 cores; time scales with params.
# - H100: small models are bound by per-step overhead: gpt2-4-4 at 64 x 512 tokens per step
#   took ~41 ms a step (~1M tokens/s, gpu-session-2026-11-24.md); larger ones by compute at
#   ~40% of the bf16 peak (6 x params flops per token).
CPU_TOKENS_PER_S_AT_328K = 30_000
GPU_STEP_OVERHEAD_S = 0.041
GPU_FLOPS = 0.4 * 989e12


def estimate_seconds(r: Run, device: str) -> float:
    """Estimated training time of ``r`` on "cpu" (2 cores) or "h100" (one, solo)."""
    facts = run_facts(r)
    if device == "cpu":
        return facts["tokens"] / (CPU_TOKENS_PER_S_AT_328K * 328_000 / facts["params_total"])
    if device != "h100":
        raise ValueError(f"device must be 'cpu' or 'h100', got {device!r}")
    batch = r.config.batch_size
    if r.config.recipe == "paper":
        from kcap.budget import paper_recipe
        batch = paper_recipe(r.config.data.n, r.config.exposures, r.config.data.kind)["batch_size"]
    per_step = batch * r.config.window
    steps = facts["tokens"] / per_step
    return steps * max(GPU_STEP_OVERHEAD_S, 6 * facts["params_total"] * per_step / GPU_FLOPS)
