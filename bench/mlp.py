"""MLPs: kcap's two designs (the activation in a Triton GEMM's epilogue, ``fused_mlp``; cuBLAS
GEMMs around one elementwise kernel, ``split_mlp``) against eager PyTorch (cuBLAS matmuls
plus separate elementwise ops) and torch.compile of the same module, forward+backward, bf16,
in one run; also the peak memory of the MLP's forward+backward.

Shapes: the paper's GPT2 MLPs (GELU, hidden 4d, biases) at d = 256 and 1280 (gpt2-4-4,
gpt2-20-20) with 24 and 96 windows of 512 tokens; the gated SiLU MLP at d = 768 (llama-12-12,
hidden 2048) and a 7B-class layer (d = 4096, hidden 11008). Without a GPU this says so and
times an interpreter-sized case on the CPU (a harness check, not a speed figure).
"""
from __future__ import annotations

from bench.harness import Stages, autotune_choices, kernel_device, peak_memory_mib, save


def run(quick: bool = False) -> None:
    import torch

    gpu, timer = kernel_device()
    from kcap.kernels import fused_mlp, gated_mlp, mlp_reference, split_mlp

    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float16)
    if gpu:  # (tokens, d, hidden, gated)
        shapes = [(t, d, 4 * d, False) for d in (256, 1280) for t in (12_288, 49_152)]
        shapes += [(t, d, h, True) for d, h in ((768, 2048), (4096, 11008)) for t in (4096, 32768)]
        shapes = [shapes[1], shapes[4]] if quick else shapes
    else:
        shapes = [(128, 64, 128, True)]
    compiled = torch.compile(mlp_reference) if gpu else None
    providers = [("eager torch", mlp_reference), ("kcap fused", fused_mlp),
                 ("kcap split", split_mlp)]
    if compiled is not None:
        providers.insert(1, ("torch.compile", compiled))
    rows = []
    stages = Stages("mlp", len(shapes))
    for tokens, d, hidden, gated in shapes:
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        named = [("w_up", (hidden, d)), ("w_down", (d, hidden))]
        named += [("w_gate", (hidden, d))] if gated else []
        w = {name: (torch.randn(*shape, device=device, dtype=dtype) / shape[1] ** 0.5).requires_grad_()
             for name, shape in named}
        if not gated:  # GPT2: biases
            w.update({name: torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
                      for name, n in (("b_up", hidden), ("b_down", d))})
        act = "silu" if gated else "gelu"
        dy = torch.randn(tokens, d, device=device, dtype=dtype)
        flops = 2 * tokens * d * hidden * (3 if gated else 2) * 3  # matmuls, forward + 2x backward
        case = (f"forward+backward {str(dtype)[6:]} {'gated silu' if gated else 'gelu'} tokens "
                f"{tokens} d {d} hidden {hidden}")
        stages.start(f"{case}: {', '.join(p for p, _ in providers)}")
        for provider, fn in providers:
            def step(fn=fn):
                y = fn(x, **w, act=act)
                torch.autograd.grad(y, [x, *w.values()], dy)

            tuned = autotune_choices(step, gated_mlp) if provider == "kcap fused" else []
            seconds = timer(step)
            row = {"case": case, "kernel": "mlp", "provider": provider, "shape": [tokens, d, hidden],
                   "gated": gated, "dtype": str(dtype), "median_s": seconds,
                   "throughput": flops / seconds / 1e12, "unit": "TFLOP/s", "autotune": tuned}
            if gpu:
                row["peak_memory_mib"] = peak_memory_mib(step)
            rows.append(row)
    stages.finish()
    save("mlp", rows, baseline="eager torch")
