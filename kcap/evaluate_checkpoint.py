"""Load a saved run (a training checkpoint, or a quantized one) and evaluate it."""
from __future__ import annotations

import json
from pathlib import Path

from kcap import checkpoint
from kcap.capacity import CapacityReport


def _run_config(run_dir: Path):
    from kcap.config_file import config_from_dict

    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{run_dir}/config.json is missing or unreadable ({err})") from None
    return config_from_dict(saved["config"], str(run_dir / "config.json"))


def checkpoint_folder(path) -> Path:
    """A checkpoint folder from a run folder (its newest intact checkpoint, with a warning
    for each newer one that is corrupt) or a checkpoint folder."""
    from kcap.console import warn

    path = Path(path)
    if (path / "quantized.json").exists() and (path / "checkpoints").is_dir():
        raise ValueError(f"{path} holds both a training run and a quantized model; kcap refuses "
                         "to guess which one you mean (quantize into a folder of its own)")
    if (path / "checkpoints").is_dir():
        path = checkpoint.newest_good(path, lambda p, err: warn(f"{err}; using an older checkpoint")) or path
    if not (path / "state.json").exists():
        raise ValueError(f"{path} is neither a run folder with checkpoints nor a checkpoint folder")
    return path


def load_run(path, device: str = "auto"):
    """(config, dataset, model, info) of a checkpoint, run folder or quantized folder.

    ``info`` holds ``params_counted`` (of the unquantized architecture) and, for a quantized
    model, ``quantized`` (its metadata) and ``stored_bits``.
    """
    import torch

    from kcap.models import build_model, parameter_report
    from kcap.run_setup import build_data, trained_token_ids

    path = Path(path)
    quantized = (path / "quantized.json").exists() and not (path / "checkpoints").is_dir()
    if quantized:
        meta = json.loads((path / "quantized.json").read_text())
        run_dir = Path(meta["run_dir"])
    else:
        path = checkpoint_folder(path)
        run_dir = path.parent.parent
    cfg = _run_config(run_dir)
    ds, stream, _ = build_data(cfg)
    model = build_model(cfg.model, ds.tokenizer.vocab_size, context=cfg.window, **cfg.model_options)
    used = trained_token_ids(stream)
    info = {"params_counted": parameter_report(model, used)["counted"]}
    if quantized:
        from kcap.quantize import load_quantized, stored_bits
        info["quantized"] = load_quantized(path, model)
        info["stored_bits"] = stored_bits(model, used)
    else:
        checkpoint.load(path, model)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    return cfg, ds, model.to(dev).eval(), info


def evaluate_checkpoint(path, sample: int | None = None, batch_size: int = 16,
                        device: str = "auto") -> tuple[CapacityReport, dict]:
    """Bits, R, R_max and accuracy of a saved model; ``info`` as in load_run."""
    from kcap.evaluate import evaluate_capacity

    cfg, ds, model, info = load_run(path, device)
    dev = next(iter(model.buffers()), next(model.parameters())).device
    report = evaluate_capacity(lambda ids: model(ids)[0], ds, info["params_counted"], sample=sample,
                               seed=cfg.seed, batch_size=batch_size, window=cfg.window, device=dev)
    return report, info
