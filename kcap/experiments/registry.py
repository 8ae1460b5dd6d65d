"""The paper's twelve headline results (spec section 1) as experiments: grids as data.

Each experiment lists its runs per preset (kcap/experiments/grids.py), the claim it tests,
how its findings are computed from the results table, and which figure draws it.
"""
from __future__ import annotations

from kcap.experiments import findings as f
from kcap.experiments.grids import QUANTIZE, run, run_facts, short, with_lrs
from kcap.experiments.spec import Experiment, Finding

# Model sizes and N per preset. smoke: 64-128 wide, one layer, a few hundred people.
# gpu: counted P ~0.26M / 0.83M / 2.4M against N = 10K-50K, so the grid crosses from
# capacity-limited (R_max > 2) to data-limited (R_max < 2) models.
SIZES = {"smoke": ("1-1", "1-2"), "gpu": ("1-1", "2-2", "2-4")}
PEOPLE = {"smoke": (100, 200), "gpu": (10_000, 20_000, 50_000)}
# The paper's grid: N from 10K to 10M and GPT2 from ~1M to ~0.5B parameters; each N keeps
# the sizes whose R_max lies in [0.25, 8], where the law's bend shows.
PAPER_PEOPLE = (10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000,
                5_000_000, 10_000_000)
PAPER_SIZES = ("1-1", "2-2", "2-4", "4-4", "4-8", "6-8", "8-8", "12-12", "16-8", "20-16",
               "25-20", "28-20")
ARCHS = ("gpt2", "llama", "mistral", "gpt2quarter", "gpt2nomlp")
LRS = {"smoke": (2.5e-3, 5e-3, 1e-2), "gpu": (5e-4, 1e-3, 2e-3), "paper": (5e-4, 1e-3, 2e-3)}
# One model and N per preset for the comparisons (architectures, MoE, junk).
COMPARE = {"smoke": (("1-1",), (100,)), "gpu": (("2-2", "2-4"), (20_000,)),
           "paper": (("4-4", "8-8", "12-12"), (100_000, 1_000_000))}


def _capacity_grid(preset, exposures, variant="online"):
    if preset != "paper":
        return [run(preset, f"gpt2-{s}", n, exposures, variant=variant)
                for n in PEOPLE[preset] for s in SIZES[preset]]
    out = []
    for n in PAPER_PEOPLE:
        for s in PAPER_SIZES:
            r = run(preset, f"gpt2-{s}", n, exposures, variant=variant)
            if 0.25 <= run_facts(r)["R_max"] <= 8:
                out.append(r)
    return out


def _archs(preset, exposures, archs=ARCHS, lr_sweep=False):
    sizes, people = COMPARE[preset]
    runs = []
    for arch in archs:
        # LLaMA's untied head would double tiny models' embedding: the paper ties it there
        options = {"tied": True} if arch in ("llama", "llamaplain", "mistral") else {}
        runs += [run(preset, f"{arch}-{s}", n, exposures, model_options=options)
                 for s in sizes for n in people]
    return with_lrs(runs, LRS[preset]) if lr_sweep else runs


def _bioD(preset):
    # One factor at a time around a centre (K, C, D, L, T): the paper sweeps each over
    # K 1-50, C 1-50, D 10-10K, L 1-50, T 20-40K.
    if preset == "smoke":
        centre, n, sizes = dict(k=2, c=2, d=10, l=2, t=20), 100, ("1-1",)
        moves = [dict(k=4), dict(d=40), dict(t=60)]
    else:
        centre = dict(k=4, c=2, d=1000, l=4, t=200)
        n, sizes = (10_000, ("1-1", "2-2")) if preset == "gpu" else (100_000, ("2-4", "4-8", "8-8"))
        moves = [dict(k=1), dict(k=20), dict(c=8), dict(d=100), dict(d=10_000), dict(l=2),
                 dict(l=16), dict(t=20), dict(t=4000)]
    runs = []
    for move in [{}] + moves:
        p = {**centre, **move}
        label = "K{k} C{c} D{d} L{l} T{t}".format(**p)
        name = "-".join([f"gpt2-{{s}}-n{short(n)}", *(f"{k}{v}" for k, v in p.items())])
        runs += [run(preset, f"gpt2-{s}", n, 1000, kind="bioD", labels={"data": label},
                     name=name.format(s=s), **p) for s in sizes]
    return runs


def _junk(preset, mixes):
    """The no-junk 100-exposure baseline and each mix at its exposures. Random junk: bioS
    of 100M people, never repeated; repetitive junk: bioS(1K)."""
    sizes, people = COMPARE[preset]
    if preset == "smoke":  # junk windows come on top (8x the tokens): fewer people
        people = (50,)
    kinds = {"random junk": dict(junk_n=100_000_000), "repetitive junk": dict(junk_n=1000),
             "random junk + marker": dict(junk_n=100_000_000, marker=True)}
    runs = [run(preset, f"gpt2-{s}", n, 100, labels={"mix": "none"}, name=f"gpt2-{s}-n{short(n)}-e100")
            for s in sizes for n in people]
    for mix, exposures in mixes:
        tag = {"random junk": "junk", "repetitive junk": "repjunk",
               "random junk + marker": "junkmarker"}[mix]
        runs += [run(preset, f"gpt2-{s}", n, e, labels={"mix": mix},
                     name=f"gpt2-{s}-n{short(n)}-e{e}-{tag}", **kinds[mix])
                 for s in sizes for n in people for e in exposures]
    return runs


def _quantized(preset):
    # smoke: the smallest model only (four quantizations per run cost more than training)
    runs = [r for r in _capacity_grid(preset, 1000)
            if preset != "smoke" or r.labels["size"] == SIZES["smoke"][0]]
    return [run(preset, r.config.model, r.config.data.n, 1000, post=QUANTIZE) for r in runs]


def _per_preset(build):
    return {p: (lambda p=p: build(p)) for p in ("smoke", "gpu", "paper")}


def _r1(rows):
    return [f.peak(rows, "paper: >= 2", 2.0), f.highest(rows, 2.3), f.reaches_r_max(rows)]


BIOR_EXPERIMENTS = ("r2",)  # experiments whose grid takes a bioR import (--bior)


def bior_grid(preset: str, folder) -> list:
    """r2's bioR row: the preset's GPT2 sizes on the imported rewrites."""
    from kcap.experiments.grids import bior_runs

    sizes = SIZES[preset] if preset != "paper" else PAPER_SIZES
    return bior_runs(preset, folder, sizes)


def _r2(rows):
    bios = [r for r in rows if r["labels"].get("variant") != "bioR"]
    bior = [r for r in rows if r["labels"].get("variant") == "bioR"]
    out = [f.peak(bios, "paper: ~2, slightly below bioS", 2.0)]
    if not bior:
        return out + [Finding("peak R on bioR", None, None, "paper: ~2, slightly below bioS", 2.0,
                              "no bioR import given: kcap experiment run r2 --bior DIR "
                              "(DIR from kcap data import-bior)")]
    return out + [f.peak(bior, "paper: ~2, slightly below bioS", 2.0, "peak R on bioR")]


def _ratios(claims, exposures=None):
    def findings(rows):
        rows = f.best_of_lr(rows) if any("lr" in r["labels"] for r in rows) else rows
        if exposures is not None:
            rows = f.where(rows, exposures=exposures)
        return [f.ratio(rows, arch, claim, value) for arch, claim, value in claims]
    return findings


def _r9(rows):
    rows = f.best_of_lr(rows)
    return [f.ratio(f.where(rows, exposures=1000), "gpt2moe", "paper: 1/1.3 at 1000 exposures",
                    1 / 1.3),
            f.ratio(f.where(rows, exposures=100), "gpt2moe", "paper: 1/1.5 at 100 exposures",
                    1 / 1.5)]


def _r8(rows):
    return [f.kept(rows, "int8-rtn", "paper: ~1 (int8 loses nothing)", 1.0),
            f.kept(rows, "int8-gptq", "paper: ~1 (int8 loses nothing)", 1.0),
            f.kept(rows, "int4-rtn", "paper: < 0.5 (int4 loses more than 2x)", 0.35),
            f.kept(rows, "int4-gptq", "paper: < 0.5 (int4 loses more than 2x)", 0.35)]


def _junk_findings(claims):
    def findings(rows):
        base = {"mix": "none", "exposures": 100}
        return [f.relative(rows, {"mix": mix, "exposures": e}, base,
                           f"R({mix}, {e} exposures) / R(no junk, 100)", claim, value)
                for mix, e, claim, value in claims]
    return findings


EXPERIMENTS = {e.key: e for e in [
    Experiment("r1", "bioS at 1000 exposures: the 2-bit law",
               "peak R >= 2; no model above 2.3; models with R_max <= 1.8 reach R ~ R_max",
               "GPT2 size x N, online bioS, 1000 exposures",
               _per_preset(lambda p: _capacity_grid(p, 1000)), _r1, "capacity",
               figure_options={"laws": [2.0]}),
    Experiment("r2", "bioS_simple (and bioR)", "also ~2 bits/param, slightly lower",
               "GPT2 size x N, bioS_simple, 1000 exposures",
               _per_preset(lambda p: _capacity_grid(p, 1000, "simple")), _r2, "capacity",
               figure_options={"laws": [2.0]}),
    Experiment("r3", "bioD: the law on other data", "peak R >= 2",
               "bioD K, C, D, L, T one at a time around a centre, GPT2 sizes, 1000 exposures",
               _per_preset(_bioD), lambda rows: [f.peak(rows, "paper: >= 2", 2.0)], "capacity",
               figure_options={"laws": [2.0], "color_by": "data"}),
    Experiment("r4", "bioS at 100 exposures: the 1-bit law", "peak R >= 1 (at most a 2x loss)",
               "GPT2 size x N, online bioS, 100 exposures",
               _per_preset(lambda p: _capacity_grid(p, 100)),
               lambda rows: [f.peak(rows, "paper: >= 1", 1.0)], "capacity",
               figure_options={"laws": [1.0, 2.0]}),
    Experiment("r5", "architectures at 1000 exposures", "all keep ~2 bits/param",
               "GPT2, LLaMA (tied), Mistral, GPT2 1/4-MLP, GPT2 no-MLP at 1000 exposures",
               _per_preset(lambda p: _archs(p, 1000)),
               _ratios([(a, "paper: ~1", 1.0) for a in ARCHS[1:]]), "architectures"),
    Experiment("r6", "architectures at 100 exposures",
               "LLaMA 1.3x below GPT2; Mistral similar; 1/4-MLP unchanged; no-MLP > 1.5x below",
               "the r5 models at 100 exposures, best of three learning rates",
               _per_preset(lambda p: _archs(p, 100, lr_sweep=True)),
               _ratios([("llama", "paper: 1/1.3", 1 / 1.3), ("mistral", "paper: ~1/1.3", 1 / 1.3),
                        ("gpt2quarter", "paper: ~1", 1.0),
                        ("gpt2nomlp", "paper: < 1/1.5", 1 / 1.5)]), "architectures",
               lr_sweep=True),
    Experiment("r7", "the gated MLP is the cause", "LLaMA with a standard MLP matches GPT2",
               "GPT2, LLaMA, LLaMA with a SiLU d->4d->d MLP at 100 exposures, best of three lrs",
               _per_preset(lambda p: _archs(p, 100, ("gpt2", "llama", "llamaplain"), True)),
               _ratios([("llamaplain", "paper: ~1", 1.0), ("llama", "paper: 1/1.3", 1 / 1.3)]),
               "architectures", lr_sweep=True),
    Experiment("r8", "quantization", "int8 keeps all the bits; int4 loses more than 2x",
               "r1-style GPT2 runs, then int8 / int4 by RTN and GPTQ (group 64), re-measured",
               _per_preset(_quantized), _r8, "quantized"),
    Experiment("r9", "mixture of experts", "GPT2-MoE (32 experts, top-1) only 1.3x lower at 1000 "
               "exposures, 1.5x at 100, counting all parameters",
               "GPT2 and GPT2-MoE at 1000 and 100 exposures",
               _per_preset(lambda p: _archs(p, 1000, ("gpt2", "gpt2moe"))
                           + _archs(p, 100, ("gpt2", "gpt2moe"))), _r9, "architectures"),
    Experiment("r10", "random junk", "7/8 junk: 20x lower at 100 exposures; 3x / 1.5x / 1.3x "
               "below the no-junk 100-exposure law at 300 / 600 / 1000",
               "1/8 useful bioS + 7/8 bioS(100M) junk at 100-1000 exposures vs no junk",
               _per_preset(lambda p: _junk(p, [("random junk", (100, 300, 600, 1000))])),
               _junk_findings([("random junk", 100, "paper: 1/20", 1 / 20),
                               ("random junk", 300, "paper: 1/3", 1 / 3),
                               ("random junk", 600, "paper: 1/1.5", 1 / 1.5),
                               ("random junk", 1000, "paper: 1/1.3", 1 / 1.3)]), "junk"),
    Experiment("r11", "repetitive junk", "no loss at 100 exposures",
               "1/8 useful bioS + 7/8 bioS(1K) junk at 100 exposures vs no junk",
               _per_preset(lambda p: _junk(p, [("repetitive junk", (100,))])),
               _junk_findings([("repetitive junk", 100, "paper: ~1", 1.0)]), "junk"),
    Experiment("r12", "a marker on useful data", "loss shrinks to 2x at 100 exposures; at 300 "
               "it matches the no-junk 100-exposure law",
               "random junk with <|useful|> before every useful biography, 100 and 300 exposures",
               _per_preset(lambda p: _junk(p, [("random junk + marker", (100, 300))])),
               _junk_findings([("random junk + marker", 100, "paper: 1/2", 0.5),
                               ("random junk + marker", 300, "paper: ~1", 1.0)]), "junk"),
]}


def get(key: str) -> Experiment:
    if key not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {key!r}; choose one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[key]
