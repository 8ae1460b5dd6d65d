"""Fused gated MLP: kcap's epilogue kernels against eager PyTorch (cuBLAS matmuls plus
separate elementwise ops) and torch.compile of the same module, forward+backward, bf16, in
one run; also the peak memory of the MLP's forward+backward.

Shapes (issue targets): d = 768 (gpt2-12-12 / llama-12-12, gated hidden 2048) and a 7B-class
layer (d = 4096, hidden 11008), tokens 8 x 512 and 16 x 2048. Without a GPU this says so and
times an interpreter-sized case on the CPU (a harness check, not a speed figure).
"""
from __future__ import annotations

from bench.harness import Stages, kernel_device, save


def run(quick: bool = False) -> None:
    import torch

    gpu, timer = kernel_device()
    from kcap.kernels import fused_mlp, mlp_reference

    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float16)
    if gpu:
        shapes = [(t, d, h) for d, h in ((768, 2048), (4096, 11008)) for t in (4096, 32768)]
        shapes = shapes[:2] if quick else shapes
    else:
        shapes = [(128, 64, 128)]
    compiled = torch.compile(mlp_reference) if gpu else None
    providers = [("eager torch", mlp_reference), ("kcap fused", fused_mlp)]
    if compiled is not None:
        providers.insert(1, ("torch.compile", compiled))
    rows = []
    stages = Stages("mlp", len(shapes))
    for tokens, d, hidden in shapes:
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        w = {name: (torch.randn(*shape, device=device, dtype=dtype) / shape[1] ** 0.5).requires_grad_()
             for name, shape in (("w_up", (hidden, d)), ("w_gate", (hidden, d)), ("w_down", (d, hidden)))}
        dy = torch.randn(tokens, d, device=device, dtype=dtype)
        flops = 2 * tokens * d * hidden * 3 * 3  # three matmuls, forward + 2x backward
        case = f"forward+backward {str(dtype)[6:]} tokens {tokens} d {d} hidden {hidden}"
        stages.start(f"{case}: {', '.join(p for p, _ in providers)}")
        for provider, fn in providers:
            def step(fn=fn):
                y = fn(x, **w, act="silu")
                torch.autograd.grad(y, [x, *w.values()], dy)

            seconds = timer(step)
            row = {"case": case, "kernel": "gated_mlp", "provider": provider,
                   "shape": [tokens, d, hidden], "dtype": str(dtype), "median_s": seconds,
                   "throughput": flops / seconds / 1e12, "unit": "TFLOP/s"}
            if gpu:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                row["peak_memory_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            rows.append(row)
    stages.finish()
    save("mlp", rows, baseline="eager torch")
