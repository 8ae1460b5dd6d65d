"""MoE: the C++ router against the torch reference router (softmax + stable sort + one-hot
cumsum + bincount) at T = 65,536, E = 32, k = 1 and 2 on the CPU; on a GPU also the CUDA
router against the same reference there, and the full MoE layer forward+backward
(32 experts, d = 512 and 1024, top-1, 16K tokens), the Triton grouped GEMM against the torch
loop over experts. One run, ratios against the baselines.
"""
from __future__ import annotations

from bench.harness import Stages, autotune_choices, save, time_gpu, time_wall


def run(quick: bool = False) -> None:
    import torch

    from kcap.models.router import cpp_available, route, route_reference

    rows = []
    logits = torch.randn(65_536, 32)
    routers = [("cpu", logits, f"kcap C++ ({torch.get_num_threads()} threads)",
                lambda fn: time_wall(fn, repeats=3 if quick else 10))]
    gpu = torch.cuda.is_available()
    if gpu:
        routers.append(("cuda", logits.cuda(), "kcap CUDA", time_gpu))
    stages = Stages("moe", 2 * len(routers) + (2 if gpu else 0))
    for device, lg, fast, timer in routers:
        for k in (1, 2):
            stages.start(f"router {device} T 65536 E 32 k {k}: torch reference and {fast}")
            providers = [("torch reference", lambda: route_reference(lg, k, 2.0))]
            if cpp_available(device):
                providers.append((fast, lambda: route(lg, k, 2.0, impl="cpp")))
            for provider, fn in providers:
                seconds = timer(fn)
                rows.append({"case": f"router {device} T 65536 E 32 k {k}", "kernel": "moe_router",
                             "provider": provider, "shape": [65_536, 32, k], "dtype": "float32",
                             "median_s": seconds, "throughput": 65_536 / seconds, "unit": "tokens/s"})
    if gpu:
        from kcap.kernels import grouped_gemm
        from kcap.models import build_model

        for d in (512, 1024):
            case = f"moe layer fwd+bwd bf16 tokens 16384 d {d} E 32 top-1"
            stages.start(f"{case}: torch reference and kcap grouped")
            for provider, impl in (("torch reference", "torch"), ("kcap grouped", "triton")):
                model = build_model(f"gpt2moe-1-{d // 64}", 1000, mlp_impl=impl).cuda().to(torch.bfloat16)
                moe = model.blocks[0].mlp.train()
                x = torch.randn(16, 1024, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

                def step(moe=moe, x=x):
                    torch.autograd.grad(moe(x).float().sum(), [x, moe.w1, moe.w2])

                tuned = autotune_choices(step, grouped_gemm) if impl == "triton" else []
                seconds = time_gpu(step)
                flops = 16_384 * 2 * 2 * d * d * 3  # two d x d matmuls per token, fwd + 2x bwd
                rows.append({"case": case, "kernel": "moe_layer", "provider": provider,
                             "shape": [16_384, d, 32], "dtype": "bfloat16", "median_s": seconds,
                             "throughput": flops / seconds / 1e12, "unit": "TFLOP/s",
                             "autotune": tuned})
    stages.finish()
    save("moe", rows, baseline="torch reference")  # the loop over experts, on the GPU rows
