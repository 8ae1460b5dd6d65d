"""Flash attention speed: kcap's Triton kernel against SDPA with the FLASH backend pinned and
with the cuDNN backend pinned, forward and forward+backward, causal, in one run.

Shapes (issue targets): head dims 64 and 128, T = 512 .. 8192 with batch x heads chosen so
each run holds 16K tokens x 2048 width, plus the paper's shape (gpt2-12-12: 12 heads of 64,
T = 512, 64 sequences). Without a GPU this says so and times an interpreter-sized case on the
CPU (a check that the harness runs, not a speed figure).
"""
from __future__ import annotations

from bench.harness import Stages, autotune_choices, kernel_device, save


def _flops(B, H, T, D, causal, backward):
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return fwd * (3.5 if backward else 1.0)  # backward ~ 2.5x the forward's matmuls


def _providers(gpu: bool):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kcap.kernels import flash_attention

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fn

    kcap = ("kcap triton", lambda q, k, v: flash_attention(q, k, v, causal=True))
    if not gpu:
        return [("sdpa (cpu)", sdpa(SDPBackend.MATH)), kcap]
    return [("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION)),
            ("sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), kcap]


def run(quick: bool = False) -> None:
    import torch

    gpu, timer = kernel_device()
    from kcap.kernels import attention as A

    if not gpu:
        shapes, dtype = [(1, 4, 128, 64)], torch.float16
    else:
        dtype = torch.bfloat16
        shapes = [(16384 // T, 2048 // D, T, D) for D in (64, 128)
                  for T in ((512, 2048) if quick else (512, 1024, 2048, 4096, 8192))]
        shapes.append((64, 12, 512, 64))  # the paper's gpt2-12-12 attention
    device = "cuda" if gpu else "cpu"
    rows = []
    stages = Stages("attention", 2 * len(shapes))
    for B, H, T, D in shapes:
        q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        do = torch.randn_like(q)
        for mode in ("forward", "forward+backward"):
            case = f"{mode} causal {str(dtype)[6:]} B{B} H{H} T{T} D{D}"
            stages.start(f"{case}: {', '.join(p for p, _ in _providers(gpu))}")
            for provider, fn in _providers(gpu):
                def step(fn=fn, mode=mode):
                    if mode == "forward":
                        with torch.no_grad():
                            fn(q, k, v)
                    else:
                        torch.autograd.grad(fn(q, k, v), (q, k, v), do)
                try:
                    # kcap's kernels: which candidate wins at this shape, and by how much
                    tuned = autotune_choices(step, A) if provider.startswith("kcap") else []
                    seconds = timer(step)
                except RuntimeError as err:  # e.g. a pinned backend that refuses the shape
                    print(f"skip {provider} on {case}: {err}")
                    continue
                flops = _flops(B, H, T, D, True, mode != "forward")
                rows.append({"case": case, "kernel": "flash_attention", "provider": provider,
                             "shape": [B, H, T, D], "dtype": str(dtype), "median_s": seconds,
                             "throughput": flops / seconds / 1e12, "unit": "TFLOP/s",
                             "autotune": tuned})
    stages.finish()
    save("attention", rows, baseline="sdpa flash" if gpu else "sdpa (cpu)")
