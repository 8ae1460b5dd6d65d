"""``kcap quantize``: quantize a trained run's checkpoint, calibrated on its own biographies."""
from __future__ import annotations

from pathlib import Path


def calibration_batches(dataset, window: int, people: int, batch_size: int = 8, seed: int = 0):
    """(B, window) id batches holding ``people`` whole training biographies (GPTQ's
    calibration set: the paper used ~1000 biographies)."""
    import torch

    from kcap.evaluate import pack_whole, sample_people

    persons = sample_people(dataset, min(people, dataset.n_people), seed)
    tokens, _ = pack_whole(dataset, persons, 0, window)
    return [torch.from_numpy(tokens[i:i + batch_size]) for i in range(0, len(tokens), batch_size)]


def quantize_run(path, out, bits: int, method: str = "gptq", group_size: int = 128,
                 calibration: int = 1000, include_head: bool = False) -> dict:
    """Quantize the checkpoint at ``path`` and save it in ``out``; return the metadata."""
    from kcap.evaluate_checkpoint import checkpoint_folder, load_run
    from kcap.quantize import quantize_model, save_quantized

    folder = checkpoint_folder(path)
    cfg, ds, model, _ = load_run(folder, device="cpu")
    batches = calibration_batches(ds, cfg.window, calibration) if method == "gptq" else None
    layers, skipped = quantize_model(model, bits, method, group_size, batches, include_head)
    meta = {"bits": bits, "method": method, "group_size": group_size if bits == 4 else 0,
            "layers": layers, "skipped": skipped, "source": str(folder.resolve()),
            "run_dir": str(folder.parent.parent.resolve()),
            "calibration_biographies": calibration if method == "gptq" else 0}
    save_quantized(Path(out), model, meta)
    return meta
