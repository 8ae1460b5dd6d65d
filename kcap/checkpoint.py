"""Checkpoints: safetensors weights and optimizer tensors, plus a small JSON state.

Layout: ``<run>/checkpoints/step-<N>/{model.safetensors, optimizer.safetensors, state.json}``
and ``<run>/checkpoints/latest`` naming the newest. A checkpoint is written into a temporary
folder and renamed into place, then ``latest`` is replaced atomically, so a crash at any
moment leaves the previous checkpoint intact and ``latest`` always names a complete one.
state.json records the files' SHA-256, so a corrupt or truncated checkpoint is refused.
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


class CheckpointError(ValueError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def save(run_dir, step: int, model, optimizer, state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` of ``model`` (unwrapped) and ``optimizer`` with ``state``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = dict(state, step=step, optimizer=opt_meta,
                    sha256={f: _sha256(tmp / f) for f in ("model.safetensors", "optimizer.safetensors")})
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    write_text(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def latest(run_dir) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def read_state(path) -> dict:
    """state.json of a checkpoint folder, after checking that its files are intact."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable state.json ({err})") from None
    for name, digest in meta.get("sha256", {}).items():
        if not (path / name).exists() or _sha256(path / name) != digest:
            raise CheckpointError(f"{path / name} is missing, corrupt or truncated (SHA-256 mismatch)")
    return meta


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
