"""The main job: train a small model on bioS and report its bits of knowledge.

CPU preset (the default without a GPU): gpt2-1-1 (64 wide, ~0.26M counted parameters) on
bioS_simple(2000) for 40 exposures at context 128, batch 8: about 2 minutes on 2 cores.
Measured on the project's 2-core machine: ~90K of the data's ~128K bits learned, R ~0.35
bits/param against R_max ~0.49, about half of the values recalled exactly (uniform guessing
would get 0.3-1%). This small, short run is far from the paper's 2 bits/param, which needs
~1000 exposures and R_max above 2. GPU preset: gpt2-4-4 on online bioS(20000), 100 exposures, context 512, bf16.
"""
from __future__ import annotations

from pathlib import Path

from kcap.train import DataConfig, TrainConfig, train

PRESETS = {
    "cpu": TrainConfig(model="gpt2-1-1", data=DataConfig(n=2000, variant="simple"), exposures=40,
                       window=128, batch_size=8, lr=5e-3, eval_every=600, eval_sample=None,
                       log_every=20, checkpoint_every=1000),
    # A few seconds, to check an installation (and for the tests); it learns little.
    "tiny": TrainConfig(model="gpt2-1-1", data=DataConfig(n=100, variant="simple"), exposures=10,
                        window=128, batch_size=8, lr=5e-3, eval_every=30, eval_sample=None,
                        log_every=5, checkpoint_every=50),
    "gpu": TrainConfig(model="gpt2-4-4", data=DataConfig(n=20_000, variant="online"),
                       exposures=100, window=512, batch_size=64, lr=1e-3, eval_every=500,
                       eval_sample=4000, log_every=50, checkpoint_every=1000),
}


def table(report: dict) -> str:
    rows = [("people", f"{report['people']:,}"),
            ("bits in the data", f"{report['bits_in_data']:,.0f}"),
            ("parameters counted", f"{report['params_counted']:,}"),
            ("bits learned", f"{report['bits_learned']:,.0f}"
             + (" (negative: losses still above a uniform guess over the pools)"
                if report["bits_learned"] < 0 else "")),
            ("R(F) bits/param", f"{report['capacity_ratio']:.3f}"),
            ("R_max(F) bits/param", f"{report['capacity_ratio_max']:.3f}")]
    literal = report["metric"].get("literal")
    if literal:
        rows.append(("R(F) read literally", f"{literal['R']:.3f} (Definition 4.3 to the letter: "
                     "see docs/science.md, section 4)"))
    for attr, acc in report["metric"]["attribute_accuracy"].items():
        rows.append((f"accuracy {attr}", f"{acc['value']:.1%} (first token {acc['first_token']:.1%})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_demo(out: str | Path, preset: str | None = None) -> dict:
    """Train the preset (cpu, or gpu when CUDA is there) in ``out``; resumes if interrupted."""
    import torch

    preset = preset or ("gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = PRESETS[preset]
    print(f"kcap demo ({preset} preset): {cfg.model} on bioS({cfg.data.n:,}, {cfg.data.variant}), "
          f"{cfg.exposures} exposures, context {cfg.window}; run folder {out}")
    report = train(cfg, out, resume=True)
    png = Path(out) / "training.png"  # drawn by train() from the run's log
    print("\n" + table(report))
    print(f"\n  [{report['metric']['param_convention']}]\n  [{report['metric']['metric_convention']}]"
          f"\nreport: {Path(out) / 'report.json'}; plot: {png}")
    return report
