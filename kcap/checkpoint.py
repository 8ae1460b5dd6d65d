"""Checkpoints: safetensors weights and optimizer tensors, a small JSON state, and a manifest.

Layout: ``<run>/checkpoints/step-<N>/{model.safetensors, optimizer.safetensors, state.json,
manifest.json}`` and ``<run>/checkpoints/latest`` naming the newest (a hint for people: kcap
finds checkpoints by listing the ``step-*`` folders, so a lost ``latest`` loses nothing).

A checkpoint is written into a temporary ``.step-*`` folder and renamed into place, so a
crash at any moment leaves the previous checkpoints intact. ``manifest.json``, written last,
holds the size and SHA-256 of every other file, state.json included: a checkpoint without a
manifest, with a file missing, truncated or changed in any byte is corrupt. Resuming takes
the newest checkpoint that verifies and says which newer ones it skipped and why.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from kcap.atomic import write_text

FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def step_of(path: Path) -> int:
    """The step a ``step-<N>`` folder holds."""
    return int(Path(path).name.split("-", 1)[1])


def save(run_dir, step: int, model, optimizer, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` of ``model`` (unwrapped) and ``optimizer`` with ``state``;
    keep the ``keep`` newest checkpoint folders."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step, optimizer=opt_meta), indent=1))
        manifest = {"files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
                              for f in FILES}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)  # the rename itself survives a power cut
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    write_text(root / "latest", final.name + "\n")
    for old in step_folders(run_dir)[keep:]:
        shutil.rmtree(old)
    return final


def step_folders(run_dir) -> list[Path]:
    """The run's ``checkpoints/step-<N>`` folders, newest first (whether intact or not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def verify(path) -> None:
    """Raise CheckpointError naming what is wrong unless every file of the checkpoint folder
    ``path`` matches its manifest (size and SHA-256)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        listed = {name: (int(v["bytes"]), str(v["sha256"])) for name, v in files.items()}
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST} (unfinished, or written by an older kcap): "
                              "its files cannot be checked") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path / MANIFEST} is corrupt ({type(err).__name__})") from None
    missing = sorted(set(FILES) - set(listed))
    if missing:
        raise CheckpointError(f"{path / MANIFEST} does not list {missing}")
    for name, (size, digest) in listed.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f} is truncated or corrupt ({f.stat().st_size:,} bytes, "
                                  f"the manifest says {size:,})")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f} is corrupt (SHA-256 differs from the manifest)")


def newest_good(run_dir, on_corrupt=None) -> Path | None:
    """The newest checkpoint folder of ``run_dir`` that verifies, or None if there is none at
    all. ``on_corrupt(path, error)`` is called for each newer folder that does not verify.
    Raises CheckpointError if checkpoints exist but none verifies (never a silent restart)."""
    folders = step_folders(run_dir)
    problems = []
    for path in folders:
        try:
            verify(path)
            return path
        except CheckpointError as err:
            problems.append(err)
            if on_corrupt is not None:
                on_corrupt(path, err)
    if folders:
        raise CheckpointError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'}: "
                              + "; ".join(str(e) for e in problems))
    return None


def latest(run_dir) -> Path | None:
    """The newest intact checkpoint folder of a run (None if it has none); see newest_good."""
    return newest_good(run_dir)


def set_aside(path) -> Path:
    """Rename a corrupt checkpoint folder to ``corrupt-step-<N>`` (kept for inspection, and
    no longer a candidate for resuming or pruning)."""
    path = Path(path)
    target = path.with_name("corrupt-" + path.name)
    n = 1
    while target.exists():
        target, n = path.with_name(f"corrupt{n}-" + path.name), n + 1
    os.replace(path, target)
    return target


def remove_partial_writes(run_dir) -> list[Path]:
    """Delete the temporary ``.step-*`` folders that a kill during a checkpoint write leaves
    behind; returns them. Only call it while holding the run's lock (a live writer's
    temporary folder looks the same)."""
    root = Path(run_dir) / "checkpoints"
    leftovers = sorted(p for p in root.glob(".step-*") if p.is_dir()) if root.is_dir() else []
    for p in leftovers:
        shutil.rmtree(p)
    return leftovers


def read_state(path) -> dict:
    """state.json of a checkpoint folder, after checking that the folder is intact."""
    path = Path(path)
    verify(path)
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:  # verified, so only a race with a writer gets here
        raise CheckpointError(f"{path}: unreadable state.json ({err})") from None


def load(path, model, optimizer=None) -> dict:
    """Load a checkpoint folder into ``model`` (and ``optimizer``); return its state."""
    path = Path(path)
    meta = read_state(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as err:  # shape mismatch and friends, reported as a checkpoint problem
        raise CheckpointError(f"{path}: weights do not fit this model ({err})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]})")
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        opt = meta["optimizer"]
        state: dict = {}
        for key, value in list(tensors.items()) + list(opt["scalars"].items()):
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    return meta
