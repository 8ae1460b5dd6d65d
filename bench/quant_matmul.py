"""Weight-only quantized matmuls: W8A16 and W4A16 (group 128) against a bf16 torch.matmul
(cuBLAS) in the same run, K = N = 4096 and 8192, M = 1 .. 16 (memory-bound; ideal ~2x and
~3.9x) and M = 64 .. 4096, where both large-M paths are timed (the tiled kernel, and
dequantize + cuBLAS, which the wrapper uses from DEQUANT_MIN_M rows) to place that
threshold. The int4 rows are w4a16.py's kernels (split-K at M <= 16, tiled above) and,
beside them, the general kernels they replaced ("general"). Cases at M <= 16 are timed
twice: called from Python (launch overhead included, as in an eager loop) and replayed
from a CUDA graph (the kernels alone, as in a graphed decoding loop; case names end in
"graph"). `--quick` on a GPU: K = N = 4096, M = 1, 4, 16. Without a GPU this says so and
times an interpreter-sized case on the CPU (a harness check, not a speed figure).
"""
from __future__ import annotations

from bench.harness import Stages, autotune_choices, kernel_device, save, time_gpu_graph


def run(quick: bool = False) -> None:
    import torch

    gpu, timer = kernel_device()
    from kcap.kernels import quant_matmul as Q
    from kcap.kernels import quant_pack as qp
    from kcap.kernels import w4a16 as W4
    from kcap.kernels.quant_matmul import int4_matmul, int8_matmul

    def forced(fn, threshold):  # run fn with the wrapper's large-M threshold set to threshold
        def run():
            saved, Q.DEQUANT_MIN_M = Q.DEQUANT_MIN_M, threshold
            try:
                return fn()
            finally:
                Q.DEQUANT_MIN_M = saved
        return run

    def general(fn):  # run fn with w4a16.py switched off (the kernels it replaced)
        def run():
            saved, W4.supports = W4.supports, lambda *args: False
            try:
                return fn()
            finally:
                W4.supports = saved
        return run

    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float16)
    if gpu:
        shapes = [(m, n) for n in ((4096,) if quick else (4096, 8192))
                  for m in ((1, 4, 16) if quick else (1, 4, 16, 64, 256, 1024, 4096))]
    else:
        shapes = [(1, 256), (32, 256)]
    rows = []
    stages = Stages("quant_matmul", len(shapes))
    for M, N in shapes:
        K = N
        w = torch.randn(N, K, device=device) / K ** 0.5
        x = torch.randn(M, K, device=device, dtype=dtype)
        w16 = w.to(dtype)
        q8, s8 = qp.quantize_int8(w)
        q4, s4, z4 = qp.quantize_int4(w, 128)
        int8, int4 = (lambda: int8_matmul(x, q8, s8)), (lambda: int4_matmul(x, q4, s4, z4, 128))
        providers = [("torch matmul", lambda: x @ w16.t())]
        if M <= Q.SMALL_M:
            providers += [("kcap int8", int8), ("kcap int4 g128", int4),
                          ("kcap int4 g128 general split-K", general(int4))]
        else:
            never, always = 1 << 62, 0
            providers += [("kcap int8 tiled", forced(int8, never)),
                          ("kcap int8 dequant+cuBLAS", forced(int8, always)),
                          ("kcap int4 g128 tiled", forced(int4, never)),
                          ("kcap int4 g128 general tiled", forced(general(int4), never)),
                          ("kcap int4 g128 dequant+cuBLAS", forced(int4, always))]
        case = f"M {M} K {K} N {N} {str(dtype)[6:]}"
        stages.start(f"{case}: {', '.join(p for p, _ in providers)}")
        timers = [(case, timer)]
        if gpu and M <= Q.SMALL_M:
            timers.append((case + " graph", time_gpu_graph))
        for name, time_fn in timers:
            for provider, fn in providers:
                try:
                    tuned = (autotune_choices(fn, Q, W4) if provider.startswith("kcap")
                             and time_fn is timer else [])  # the graph rows reuse the choice
                    seconds = time_fn(fn)
                except Exception as err:  # e.g. a capture that fails: the other rows still count
                    print(f"{name} | {provider}: failed: {' '.join(str(err).split())[:200]}")
                    continue
                rows.append({"case": name, "kernel": "quant_matmul", "provider": provider,
                             "shape": [M, K, N], "dtype": str(dtype), "median_s": seconds,
                             "throughput": 2 * M * K * N / seconds / 1e12, "unit": "TFLOP/s",
                             "autotune": tuned})
    stages.finish()
    save("quant_matmul", rows, baseline="torch matmul", notes=crossovers(rows, Q.DEQUANT_MIN_M))


def crossovers(rows: list[dict], threshold: int) -> list[str]:
    """Where dequantize + cuBLAS overtakes the tiled kernel, per format and N, from the
    eager rows at M > 16 (what DEQUANT_MIN_M, ``threshold`` here, should be placed by)."""
    out = []
    for fmt in ("int8", "int4 g128"):
        for n in sorted({r["shape"][2] for r in rows}):
            times = {}
            for r in rows:
                if r["shape"][2] == n and not r["case"].endswith("graph"):
                    for kind in ("tiled", "dequant+cuBLAS"):
                        if r["provider"] == f"kcap {fmt} {kind}":
                            times.setdefault(r["shape"][0], {})[kind] = r["median_s"]
            both = sorted(m for m, t in times.items() if len(t) == 2)
            if not both:
                continue
            faster = [m for m in both if times[m]["dequant+cuBLAS"] < times[m]["tiled"]]
            where = (f"from M = {faster[0]}" + ("" if faster == both[both.index(faster[0]):]
                                                 else " (not at every larger M)")
                     if faster else "at no M measured")
            out.append(f"{fmt}, K = N = {n}: dequantize + cuBLAS is faster {where} (M measured: "
                       f"{', '.join(map(str, both))}); DEQUANT_MIN_M is {threshold}")
    return out
