"""bench.harness.autotune_choices records what Triton's autotuner chose at each key and
every candidate's time, through the autotuner's own code path (its timing replaced by a
fake, so it runs in the interpreter too), and leaves the kernel as it found it."""
import types

import pytest
import torch
import triton
import triton.language as tl

from bench.harness import autotune_choices, markdown

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# what a result file's header needs (bench.harness.environment's keys)
ENV = {"device": "dev", "cpu_count": 2, "python": "3", "numpy": "2", "torch": "2", "triton": "3",
       "date": "2026-12-06", "git_commit": "abc", "command": "python -m bench x"}


def _kernel():
    # a fresh Autotuner per test: its cache and attributes are what the tests inspect
    @triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=4, num_stages=2),
                              triton.Config({"BLOCK": 32}, num_warps=8, num_stages=3)], key=["n"])
    @triton.jit
    def _double(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, 2 * tl.load(X + offs, mask=offs < n), mask=offs < n)

    return _double


def _fake_timer(times):
    """do_bench's stand-in: runs the call (so the kernel is exercised) and returns the next
    [median, p20, p80] in milliseconds."""
    times = iter(times)

    def do_bench(fn, quantiles):
        fn()
        return next(times)
    return do_bench


def _launch(kernel, x, y, n):
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)


def test_each_key_gets_its_own_choice_and_times():
    kernel = _kernel()
    # key n=40: BLOCK=32 wins; key n=33: BLOCK=16 wins
    kernel.do_bench = _fake_timer([[3.0, 2, 4], [1.5, 1, 2], [0.5, 0.4, 0.6], [0.9, 0.8, 1]])
    x = torch.arange(40.0, device=DEVICE)
    y = torch.zeros_like(x)
    found = autotune_choices(lambda: (_launch(kernel, x, y, 40), _launch(kernel, x, y, 33)),
                             types.SimpleNamespace(_double=kernel, unrelated=3))
    small, large = "BLOCK=16, 4 warps, 2 stages", "BLOCK=32, 8 warps, 3 stages"
    assert found == [{"kernel": "double", "key": {"n": 40}, "chosen": large,
                      "ms": {small: 3.0, large: 1.5}},
                     {"kernel": "double", "key": {"n": 33}, "chosen": small,
                      "ms": {small: 0.5, large: 0.9}}]
    assert torch.equal(y, 2 * x)  # the kernel still computed
    # the instance is as before (its own _bench method, a plain dict cache) plus the choices
    assert "_bench" not in vars(kernel) and type(kernel.cache) is dict
    assert sorted(key[0] for key in kernel.cache) == [33, 40]


def test_a_step_that_fails_still_restores_the_kernel():
    kernel = _kernel()
    kernel.cache = {"earlier": "choice"}

    def step():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        autotune_choices(step, types.SimpleNamespace(_double=kernel))
    assert "_bench" not in vars(kernel) and kernel.cache == {"earlier": "choice"}


def test_markdown_lists_the_choices_fastest_first():
    row = {"case": "c", "provider": "kcap", "median_s": 1e-3, "throughput": 1.0, "unit": "x/s",
           "autotune": [{"kernel": "k", "key": {"T": 512}, "chosen": "B=2",
                         "ms": {"B=1": 0.3, "B=2": 0.1, "B=3": 0.2}}]}
    text = markdown("x", ENV, [row], baseline="kcap")
    assert "## Autotuning" in text
    assert "| c | kcap | k | T=512 | B=2 | B=2: 0.1 · B=3: 0.2 · B=1: 0.3 |" in text
    assert "## Autotuning" not in markdown("x", ENV, [{**row, "autotune": []}], baseline="kcap")


def test_quant_matmul_crossover_notes():
    """bench quant_matmul says from which M dequantize + cuBLAS beats the tiled kernel (what
    places DEQUANT_MIN_M), and when that is not so at every larger M."""
    from bench.quant_matmul import crossovers

    def row(m, n, provider, seconds, case=""):
        return {"case": case or f"M {m} K {n} N {n} bfloat16", "provider": provider,
                "shape": [m, n, n], "median_s": seconds}
    tiled = {64: 1.0, 256: 2.0, 1024: 4.0}
    dequant = {64: 1.5, 256: 1.9, 1024: 3.0}
    rows = [row(m, 4096, "kcap int8 tiled", t) for m, t in tiled.items()]
    rows += [row(m, 4096, "kcap int8 dequant+cuBLAS", t) for m, t in dequant.items()]
    rows += [row(m, 8192, "kcap int4 g128 tiled", t) for m, t in tiled.items()]
    rows += [row(m, 8192, "kcap int4 g128 dequant+cuBLAS", t) for m, t in {64: 0.5, 256: 3.0, 1024: 3.0}.items()]
    rows.append(row(64, 4096, "kcap int8 dequant+cuBLAS", 0.1, case="M 64 K 4096 N 4096 bfloat16 graph"))
    assert crossovers(rows, 1024) == [
        "int8, K = N = 4096: dequantize + cuBLAS is faster from M = 256 (M measured: 64, 256, 1024); "
        "DEQUANT_MIN_M is 1024",
        "int4 g128, K = N = 8192: dequantize + cuBLAS is faster from M = 64 (not at every larger M) "
        "(M measured: 64, 256, 1024); DEQUANT_MIN_M is 1024"]
    text = markdown("x", ENV, [], baseline="kcap", notes=["a finding"])
    assert text.endswith("## Notes\n\n- a finding\n")
