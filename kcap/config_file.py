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
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

from kcap.run_config import DataConfig, TrainConfig


def config_from_dict(raw: dict, source: str = "config") -> TrainConfig:
    """A TrainConfig from a parsed TOML (or config.json) mapping; every error is a one-line
    ValueError or TypeError that starts with ``source`` and names the key."""
    if not isinstance(raw, Mapping):
        raise TypeError(f"{source}: a config must be a table of keys, got {type(raw).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; allowed: {sorted(known)}")
    for table in ("data", "model_options"):
        if table in raw and not isinstance(raw[table], Mapping):
            raise TypeError(f"{source}: [{table}] must be a table, got "
                            f"{type(raw[table]).__name__} {raw[table]!r}")
    data = dict(raw.get("data", {}))
    data_known = {f.name for f in fields(DataConfig)}
    bad = sorted(set(data) - data_known, key=str)
    if bad:
        raise ValueError(f"{source}: unknown [data] keys {bad}; allowed: {sorted(data_known)}")
    try:
        return TrainConfig(**{**raw, "data": data})
    except TypeError as err:
        raise TypeError(f"{source}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def load_config(path) -> TrainConfig:
    """Read a TOML file into a TrainConfig (ValueError or TypeError naming the file, and the
    key where one is at fault)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"config file {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {err.start}); TOML files "
                         "are UTF-8") from None
    except OSError as err:
        raise ValueError(f"config file {path} cannot be read ({err.strerror or err})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    return config_from_dict(raw, str(path))
