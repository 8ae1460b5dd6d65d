"""Evaluate a saved run: rebuild its data and model from config.json, load the weights."""
from __future__ import annotations

import json
from pathlib import Path

from kcap import checkpoint
from kcap.capacity import CapacityReport


def evaluate_checkpoint(path, sample: int | None = None, batch_size: int = 16,
                        device: str = "auto") -> CapacityReport:
    """Bits, R, R_max and accuracy of a checkpoint (a run folder means its latest one)."""
    import torch

    from kcap.config_file import config_from_dict
    from kcap.evaluate import evaluate_capacity
    from kcap.models import build_model, parameter_report
    from kcap.train import build_data

    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = checkpoint.latest(path) or path
    if not (path / "state.json").exists():
        raise ValueError(f"{path} is neither a run folder with checkpoints nor a checkpoint folder")
    run_dir = path.parent.parent
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{run_dir}/config.json is missing or unreadable ({err})") from None
    cfg = config_from_dict(saved["config"], str(run_dir / "config.json"))
    ds, _, _ = build_data(cfg)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = build_model(cfg.model, ds.tokenizer.vocab_size, context=cfg.window, **cfg.model_options)
    checkpoint.load(path, model)
    model.to(dev).eval()
    params = parameter_report(model, ds.used_token_ids())
    return evaluate_capacity(lambda ids: model(ids)[0], ds, params["counted"], sample=sample,
                             seed=cfg.seed, batch_size=batch_size, window=cfg.window, device=dev)
