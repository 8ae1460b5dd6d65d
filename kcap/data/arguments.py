"""Argument checks shared by the data generators: every error names the parameter and
the allowed range, and is raised before any work (or any file) is done."""
from __future__ import annotations

import numbers

import numpy as np


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (high None: unbounded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high:,}"
        raise ValueError(f"{name} must be >= {low:,}{upper}, got {value:,}")
    return value


def check_index_array(name: str, values, high: int | None) -> np.ndarray:
    """1-d int64 array of indices in [0, high) (high None: only >= 0)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or (high is not None and arr.max() >= high)):
        bound = "" if high is None else f" and < {high:,}"
        raise ValueError(f"{name} must be >= 0{bound}; got values in "
                         f"[{arr.min():,}, {arr.max():,}]")
    return arr


def check_people(persons, exposures, n_people: int) -> tuple[np.ndarray, np.ndarray]:
    """Person indices in [0, n_people) and exposure indices >= 0, of one length."""
    persons = check_index_array("persons", persons, n_people)
    exposures = check_index_array("exposures", np.broadcast_to(exposures, persons.shape)
                                  if np.ndim(exposures) == 0 else exposures, None)
    if persons.shape != exposures.shape:
        raise ValueError(f"persons and exposures differ in length: {persons.shape} vs "
                         f"{exposures.shape}")
    return persons, exposures
