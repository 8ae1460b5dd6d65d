"""TOML run configs mapping onto TrainConfig. Example (configs/gpt2-bios.toml):

    model = "gpt2-4-4"
    exposures = 100
    batch_size = 64
    lr = 1e-3
    [data]
    kind = "bioS"
    n = 20000
    [model_options]
    tied = true

Unknown keys are errors (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from kcap.run_config import DataConfig, TrainConfig


def config_from_dict(raw: dict, source: str = "config") -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; allowed: {sorted(known)}")
    data = dict(raw.get("data", {}))
    data_known = {f.name for f in fields(DataConfig)}
    bad = sorted(set(data) - data_known)
    if bad:
        raise ValueError(f"{source}: unknown [data] keys {bad}; allowed: {sorted(data_known)}")
    return TrainConfig(**{**raw, "data": DataConfig(**data)})


def load_config(path) -> TrainConfig:
    """Read a TOML file into a TrainConfig (ValueError with the file's name on problems)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    return config_from_dict(raw, str(path))
