"""``kcap quantize``: quantize a trained run's checkpoint, calibrated on its own biographies."""
from __future__ import annotations

from pathlib import Path

from kcap.run_lock import LOCK_NAME, enclosing_run, run_lock


def calibration_batches(dataset, window: int, people: int, batch_size: int = 8, seed: int = 0):
    """(B, window) id batches holding ``people`` whole training biographies (GPTQ's
    calibration set: the paper used ~1000 biographies)."""
    import torch

    from kcap.evaluate import pack_whole, sample_people

    persons = sample_people(dataset, min(people, dataset.n_people), seed)
    tokens, _ = pack_whole(dataset, persons, 0, window)
    return [torch.from_numpy(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)]


def check_output_folder(out) -> Path:
    """``out`` as a Path, refused if it lies in (or is) a run folder or a checkpoint folder,
    or is a non-empty folder that does not hold an earlier quantized model: writing there
    would overwrite a training checkpoint or make ``kcap eval RUN`` silently evaluate the
    quantized model instead of the run."""
    out = Path(out)
    run = enclosing_run(out)
    if run is not None:
        raise ValueError(f"--out {out} lies inside the run folder {run}; quantize into a "
                         "folder of its own (for example next to the run)")
    for folder in [out, *out.resolve().parents]:
        if (folder / "state.json").is_file():
            raise ValueError(f"--out {out} lies inside the checkpoint folder {folder}; quantize "
                             "into a folder of its own")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) \
            and not (out / "quantized.json").is_file():
        raise ValueError(f"--out {out} is a folder that holds other files; choose an empty or new one")
    return out


def quantize_run(path, out, bits: int, method: str = "gptq", group_size: int = 128,
                 calibration: int = 1000, include_head: bool = False) -> dict:
    """Quantize the checkpoint at ``path`` and save it in ``out``; return the metadata.
    ``out`` must be a new folder, an empty one or an earlier quantized model's (replaced)."""
    from kcap.evaluate_checkpoint import checkpoint_folder

    out = check_output_folder(out)
    folder = checkpoint_folder(path)
    with run_lock(out, "quantize"):
        return _quantize(folder, out, bits, method, group_size, calibration, include_head)


def _quantize(folder: Path, out: Path, bits, method, group_size, calibration, include_head) -> dict:
    from kcap.evaluate_checkpoint import load_run
    from kcap.quantize import quantize_model, save_quantized

    cfg, ds, model, _ = load_run(folder, device="cpu")
    batches = calibration_batches(ds, cfg.window, calibration) if method == "gptq" else None
    layers, skipped = quantize_model(model, bits, method, group_size, batches, include_head)
    meta = {"bits": bits, "method": method, "group_size": group_size if bits == 4 else 0,
            "layers": layers, "skipped": skipped, "source": str(folder.resolve()),
            "run_dir": str(folder.parent.parent.resolve()),
            "calibration_biographies": calibration if method == "gptq" else 0}
    save_quantized(out, model, meta)
    return meta
