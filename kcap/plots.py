"""Figures made from a run's files (log.jsonl), never from a live run's memory."""
from __future__ import annotations

from pathlib import Path

from kcap.atomic import atomic_path
from kcap.run_log import read_log


def plot_run(run_dir, path=None) -> Path:
    """Loss and bits learned over training of one run, as a PNG (default run_dir/training.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    if not train:
        raise ValueError(f"{run_dir}/log.jsonl has no training records to plot")
    fig, (ax_loss, ax_bits) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax_loss.set(xlabel="step", ylabel="training loss (nats/token)", yscale="log",
                title="loss")
    if evals:
        steps = [r["step"] for r in evals]
        ax_bits.plot(steps, [r["eval"]["bits"] for r in evals], "o-", label="bits learned")
        ax_bits.axhline(evals[-1]["eval"]["bits_max"], color="gray", ls="--",
                        label="bits in the data")
        if min(r["eval"]["bits"] for r in evals) < 0:  # early models score below the guesser
            ax_bits.axhline(0, color="black", lw=0.6, label="a uniform guess over the pools")
        top = max(evals[-1]["eval"]["bits_max"], max(r["eval"]["bits"] for r in evals))
        ax_bits.set_ylim(top=top * 1.45)  # headroom: the legend sits above the data's line
        ax_bits.legend(loc="upper left", fontsize="small")
        last = evals[-1]["eval"]
        ax_bits.set_title(f"R = {last['R']:.3f} of R_max {last['R_max']:.3f} bits/param")
    ax_bits.set(xlabel="step", ylabel="bits")
    fig.tight_layout()
    path = Path(path) if path else Path(run_dir) / "training.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
