"""LM head + cross-entropy: kcap's fused kernel against eager PyTorch (the models' own loss:
logits in the model's dtype, the loss in fp32) and Liger-Kernel's fused linear
cross-entropy when it is installed, forward+backward, in one run; also each one's peak
memory above its inputs (the issue's target: <= 0.5x eager at >= 1.0x its speed). A third
kcap row runs the kernel with Liger's chunk rule (chunk logits the size of x: ~V / D chunks),
kcap's default until 2026-12-06, to show what the 64 MiB chunk floor changes at small d.
Pack cases (8 models, as kcap.pack's loss): the torch path, the fused kernel called once
per model (kcap.pack until 2026-12-06) and ``stacked_linear_cross_entropy`` (all at once).

Shapes: the paper's vocabulary (kcap's 4,337 tokens), widths d = 64-1280 (gpt2-1-1 to
gpt2-20-20) and 12K-200K tokens per step (24-384 windows of 512). Liger is on PyPI (pure
Python): `pip download liger-kernel --no-deps -d bench/wheels` on a machine with network,
then carry bench/wheels to the GPU machine (bench/gpu_session.sh installs what it finds
there). Without a GPU this says so and times an interpreter-sized case on the CPU (a harness
check, not a speed figure).
"""
from __future__ import annotations

from bench.harness import Stages, kernel_device, peak_memory_mib, save


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)


def run(quick: bool = False) -> None:
    import torch

    gpu, timer = kernel_device()
    import torch.nn.functional as F
    import triton

    from kcap.data.tokenizer import default_tokenizer
    from kcap.kernels.cross_entropy import (linear_cross_entropy, linear_cross_entropy_reference,
                                            stacked_linear_cross_entropy)

    vocab = default_tokenizer().vocab_size
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    # (models, tokens per model, d): one model, then packs of 8 (kcap.pack's fused loss)
    if gpu:
        shapes = [(1, t, d) for d in (64, 256, 768, 1280) for t in (12_288, 49_152, 196_608)]
        shapes += [(8, 12_288, d) for d in (64, 256)]
        shapes = [(1, 12_288, 64), (1, 49_152, 768), (8, 12_288, 64)] if quick else shapes
    else:
        shapes = [(1, 256, 64), (2, 128, 64)]

    def x_size_chunks(x, w, t):  # kcap's default until 2026-12-06, Liger's rule: ~V / D chunks
        n, d = x.shape
        chunk = min(n, triton.next_power_of_2(triton.cdiv(n, triton.cdiv(w.shape[0], d))))
        return linear_cross_entropy(x, w, t, chunk=chunk)

    solo = [("eager torch", lambda x, w, t: linear_cross_entropy_reference(x, w, t)),
            ("kcap fused", lambda x, w, t: linear_cross_entropy(x, w, t)),
            ("kcap fused, x-size chunks", x_size_chunks)]
    liger = _liger() if gpu else None
    if liger is not None:
        solo.append(("liger fused", liger))
    elif gpu:
        print("liger-kernel is not installed: its rows are missing (see the module docstring)")
    # a pack's M losses, summed for the backward: the torch path (as kcap.pack's, batched
    # logits), the fused kernel called per model (kcap.pack until 2026-12-06), and stacked
    def pack_torch(x, w, t):  # batched logits, one fp32 cross-entropy: kcap.pack's torch loss
        logits = torch.bmm(x, w.transpose(1, 2)).float()
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="none")
        return losses.view(len(x), -1).mean(1).sum()

    pack = [("eager torch", pack_torch),
            ("kcap fused, a call per model", lambda x, w, t: sum(linear_cross_entropy(x[i], w[i], t[i])
                                                                 for i in range(len(x)))),
            ("kcap stacked", lambda x, w, t: stacked_linear_cross_entropy(x, w, t).sum())]
    rows = []
    stages = Stages("cross_entropy", len(shapes))
    for models, tokens, d in shapes:
        lead = (models,) if models > 1 else ()
        x = torch.randn(*lead, tokens, d, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(*lead, vocab, d, device=device, dtype=dtype) / d ** 0.5).requires_grad_()
        t = torch.randint(0, vocab, (*lead, tokens), device=device)
        flops = 2 * models * tokens * d * vocab * 3  # logits, then dx and dW
        case = (f"forward+backward {str(dtype)[6:]} {f'{models} models x ' if lead else ''}"
                f"tokens {tokens} d {d} V {vocab}")
        providers = pack if lead else solo
        stages.start(f"{case}: {', '.join(p for p, _ in providers)}")
        for provider, fn in providers:
            def step(fn=fn):
                torch.autograd.grad(fn(x, w, t), [x, w])

            row = {"case": case, "kernel": "linear_cross_entropy", "provider": provider,
                   "shape": [models, tokens, d, vocab], "dtype": str(dtype), "unit": "TFLOP/s"}
            try:
                seconds = timer(step)
            except torch.OutOfMemoryError:
                rows.append({**row, "median_s": float("nan"), "throughput": float("nan"),
                             "note": "out of memory"})
                torch.cuda.empty_cache()
                continue
            row.update(median_s=seconds, throughput=flops / seconds / 1e12)
            if gpu:
                row["peak_memory_mib"] = peak_memory_mib(step)
            rows.append(row)
    stages.finish()
    save("cross_entropy", rows, baseline="eager torch")
