"""Registers, spills and shared memory of every kernel and autotuning candidate on sm_90,
compiled on a machine without a GPU (issue 16: look before spending device time).

Triton compiles to a cubin for any target offline (ptxas ships in its wheel); ``ptxas -v``
on the PTX then reports registers per thread, spill stores and loads, and the cubin's
shared memory. A candidate that spills, needs more than the 255 registers a thread can
have, or more shared memory than an H100 block may use (227 KB) is flagged: it will be slow
or fail to launch, whatever its tile shapes promise. Kernels are compiled in bf16 at the
paper's head dim 64 (and 128), with every constexpr variant the wrappers launch, and with
the JIT's specialization for typical arguments (aligned pointers, strides of 1 as
constants, sizes divisible by 16 hinted): without it Triton emits scalar, unpipelined
loads and the register counts say nothing about the real kernels.

For the W4A16 kernels it also counts the SASS instructions of the main loop per weight
dequantized there (nvdisasm, also in the wheel): at decode sizes the bytes are few, and
instruction issue, not memory, can set the speed.

Trial candidates (kernels/runtime.py) are compiled too and marked "(trial)": this table is
where they come from. Writes bench/results/registers-sm90-<date>.md. Needs no GPU; about
a minute on 2 cores.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from bench.harness import Stages, environment, result_stem

# Compile every trial candidate as well: set before the kernels are imported (in _kernels),
# since their autotuning lists are fixed at import.
os.environ["KCAP_TRIAL_CANDIDATES"] = "1"

SHARED_LIMIT = 227 * 1024  # the H100's largest dynamic shared memory per block
TARGET = ("cuda", 90, 32)


def _strides(*shape) -> list[int]:
    """Strides of a contiguous tensor of this shape."""
    out, step = [], 1
    for size in reversed(shape):
        out.append(step)
        step *= size
    return out[::-1]


# Integer arguments at the paper's shapes (batch 8, 4 heads, T = 512, head dim 64, MLP
# 768 -> 2048, 4,096 tokens): the JIT specializes on them (an int equal to 1 becomes a
# constant, one divisible by 16 gets that hint, as do 16-byte-aligned pointers), and the
# code it generates (vector loads, async copies) and so its registers depend on that.
B, H, T, D = 8, 4, 512, 64
_ATT = dict(zip(("sqb", "sqh", "sqt", "sqd"), _strides(B, H, T, D)))
ATTENTION_INTS = {**{k.replace("q", x, 1): v for x in ("q", "o", "d", "dq") for k, v in _ATT.items()},
                  **{k.replace("q", x, 1).replace("t", "s"): v for x in ("k", "v", "dk", "dv")
                     for k, v in _ATT.items()},  # keys and values: sequence stride "s"
                  "H": H, "KV": H, "GROUP": 1, "T": T, "S": T}
M, K, N = 4096, 768, 2048
INTS = {**ATTENTION_INTS, "M": M, "N": N, "K": K,
        # fused MLP GEMM: x (M, K); weights in Linear layout read transposed
        "sam": K, "sak": 1, "sb1k": 1, "sb1n": K, "sb2k": 1, "sb2n": K,
        # grouped GEMM: x (M, K), weights (E, K, N), y (M, N)
        "sxm": K, "sxk": 1, "swe": K * N, "swk": N, "swn": 1, "sbe": N, "sym": N, "syn": 1,
        "k_per_split": K, "so_split": M * N,
        "stride": 4337, "V": 4337, "ignore_index": -100,  # cross-entropy rows of kcap's vocabulary
        "stride_tm": 12_288, "stride_lm": 12_288, "rows_per_model": 7737,  # a pack's 12K-token chunks
        "n": M * N}  # elementwise


def _kernels():
    """(label, kernel, {arg: type}, {constexpr: value}, {int arg: value}) of every launch
    variant: types are Triton's signature strings; args not typed are i32 with the value
    given (sizes and strides at the paper's shapes)."""
    from kcap.kernels import attention as A
    from kcap.kernels import cross_entropy as C
    from kcap.kernels import gated_mlp as G
    from kcap.kernels import grouped_gemm as GG
    from kcap.kernels import mlp_elementwise as E
    from kcap.kernels import quant_matmul as Q
    from kcap.kernels import w4a16 as W4

    bf, f32 = "*bf16", "*fp32"
    out = []
    for d in (64, 128):
        for causal in (True, False):
            tag = f"D={d} {'causal' if causal else 'full'}"
            out.append((f"attention forward {tag}", A._fwd_kernel,
                        {"Q": bf, "K": bf, "V": bf, "O": bf, "LSE": f32, "qk_scale": "fp32"},
                        {"HEAD_DIM": d, "CAUSAL": causal, "DOT": "tf32"}))
            grads = {"Q": bf, "K": bf, "V": bf, "DO": bf, "LSE": f32, "DELTA": f32,
                     "qk_scale": "fp32", "scale": "fp32"}
            out.append((f"attention backward dK dV {tag}", A._bwd_dkdv_kernel,
                        {**grads, "DK": bf, "DV": bf}, {"HEAD_DIM": d, "CAUSAL": causal, "DOT": "tf32"}))
            out.append((f"attention backward dQ {tag}", A._bwd_dq_kernel, {**grads, "DQ": bf},
                        {"HEAD_DIM": d, "CAUSAL": causal, "DOT": "tf32"}))
        out.append((f"attention backward delta D={d}", A._bwd_delta_kernel,
                    {"O": bf, "DO": bf, "DELTA": f32}, {"HEAD_DIM": d, "BLOCK_M": 64}))
    gemm_ptrs = {name: bf for name in ("A", "B1", "B2", "BIAS1", "BIAS2", "P1", "P2", "OUT", "OUT1",
                                       "OUT2")}
    for mode, name in enumerate(("forward gated", "forward act", "backward gated", "backward act")):
        # backward: B is W_down (D, N) read as (K = D, N) directly
        strides = {"sb1k": N, "sb1n": 1, "sb2k": N, "sb2n": 1} if mode >= 2 else {}
        out.append((f"fused MLP GEMM {name}", G._epilogue_gemm, {**gemm_ptrs, **strides},
                    {"MODE": mode, "GELU": mode in (1, 3), "HAS_BIAS": mode < 2, "DOT": "tf32"}))
    for gated, backward in ((True, False), (True, True), (False, False), (False, True)):
        out.append((f"split MLP elementwise {'gated' if gated else 'gelu'} "
                    f"{'backward' if backward else 'forward'}", E._activation,
                    {name: bf for name in ("G", "U", "DH", "H", "DG", "DU")},
                    {"GATED": gated, "GELU": not gated, "BACKWARD": backward, "BLOCK": E.BLOCK}))
    for block_v in (4096,):
        out.append((f"linear cross-entropy rows (BLOCK_V={block_v})", C._ce_rows,
                    {"logits_ptr": bf, "targets_ptr": "*i64", "loss_ptr": f32, "inv_n_ptr": f32},
                    {"BLOCK_V": block_v, "WRITE_GRAD": True}))
    out.append(("MoE grouped GEMM", GG._grouped_mm,
                {"X": bf, "W": bf, "BIAS": bf, "BLOCK_EXPERT": "*i64", "Y": bf},
                {"HAS_BIAS": True, "BLOCK_M": 64, "DOT": "tf32"}))
    out.append(("MoE grouped weight gradient", GG._grouped_wgrad,
                {"X": bf, "DY": bf, "SEG": "*i64", "DW": bf}, {"BLOCK_M": 64, "DOT": "tf32"}))
    for dt in (bf, "*fp16"):
        half = {"X": dt, "W": "*i32", "S": f32, "Z": "*u8", "BIAS": dt, "OUT": dt,
                "swn": K // 8, "ssn": K // 128, "ssg": 1}
        magic = {"GROUP": 128, "HAS_BIAS": False, "MAGIC": 0x4300 if dt == bf else 0x6400,
                 "BASE": 128.0 if dt == bf else 1024.0}
        out.append((f"W4A16 half split-K {dt[1:]}", W4._w4_split,
                    {**half, "PART": f32, "COUNT": "*i32", "M": 4}, magic))
        out.append((f"W4A16 half tiled {dt[1:]}", W4._w4_tiled, {**half, "M": 512}, magic))
    for bits, group in ((8, 0), (4, 128)):
        general = " general" if bits == 4 else ""  # int4 here only for fp32 activations
        w = "*i8" if bits == 8 else "*u8"
        # weights (N, K) int8 or (N, K / 2) packed int4, scales per channel or per group
        ptrs = {"X": bf, "W": w, "S": f32, "Z": "*u8", "BIAS": bf, "swn": K if bits == 8 else K // 2,
                "swk": 1, "ssn": 1 if bits == 8 else K // group, "ssg": 0 if bits == 8 else 1}
        for split in (True, False):
            out.append((f"W{bits}A16{general} small M{' split-K' if split else ''}", Q._wq_small,
                        {**ptrs, "OUT": f32 if split else bf, "M": 4},
                        {"BITS": bits, "GROUP": group, "SPLIT": split, "HAS_BIAS": False,
                         "BLOCK_K": group if bits == 4 else 64, "DOT": "tf32"}))
        out.append((f"W{bits}A16{general} large M", Q._wq_large, {**ptrs, "OUT": bf},
                    {"BITS": bits, "GROUP": group, "SPLIT": False, "HAS_BIAS": False,
                     "BLOCK_K": group if bits == 4 else 64, "DOT": "tf32"}))
    return out


def _candidates(kernel):
    """(jit function, [(label, constexprs, num_warps, num_stages)]) of a kernel: each
    autotuning config, or the launch default (4 warps, 3 stages... as Triton's)."""
    from triton.runtime.autotuner import Autotuner

    from kcap.kernels.runtime import is_trial

    if isinstance(kernel, Autotuner):
        return kernel.fn, [(" ".join(f"{k}={v}" for k, v in c.kwargs.items())
                            + (" (trial)" if is_trial(c) else ""), dict(c.kwargs),
                            c.num_warps, c.num_stages) for c in kernel.configs]
    return kernel, [("default", {}, 4, 3)]


def _specialized(fn, types: dict, constexprs: dict):
    """(signature, constexprs, attrs) as the JIT would build them for these arguments:
    aligned pointers and ints divisible by 16 get the divisibility hint, ints equal to 1
    become constants. ``types`` gives a type string or an int value per argument; other
    int arguments take their value from INTS."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            continue
        kind = types.get(p.name, INTS.get(p.name))
        if isinstance(kind, str):
            signature[p.name] = kind
            if kind.startswith("*"):  # torch allocations are 16-byte aligned
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(kind, int):
            if kind == 1:
                signature[p.name], constants[p.name] = "constexpr", 1
            else:
                signature[p.name] = "i32"
                if kind % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(f"{fn.__name__}: no type or value for argument {p.name}")
    return signature, constants, attrs


def _tool(name: str) -> str:
    """Path of a CUDA binary shipped in Triton's wheel (ptxas, nvdisasm)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _loop_instructions(cubin: bytes) -> tuple[int, int]:
    """(instructions, integer-to-float conversions) of the kernel's main loop in SASS: the
    longest span from a label to a branch back to it (nvdisasm, shipped with Triton)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        lines = subprocess.run([_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if re.match(r"\s*/\*[0-9a-f]+\*/", x)]
            best = max(best, body, key=len)
    return len(best), sum(" I2F" in x for x in best)


def _compile(fn, types: dict, constexprs: dict, warps: int, stages: int) -> dict:
    """{regs, spill_stores, spill_loads, shared, cubin} of one compiled variant (ptxas -v)."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constants, attrs = _specialized(fn, types, constexprs)
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget(*TARGET),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([_tool("ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o",
                                 os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                                check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                       report).groups())
    return {"regs": regs, "spill_stores": stores, "spill_loads": loads,
            "shared": int(getattr(compiled.metadata, "shared", 0)), "cubin": compiled.asm["cubin"]}


def run(quick: bool = False) -> Path:
    from kcap.atomic import write_text

    from kcap.kernels import runtime

    if not runtime.TRIAL:  # imported before this module set the variable
        raise RuntimeError("bench registers must run in its own process (python -m bench registers)")
    kernels = _kernels()
    if quick:
        kernels = kernels[:3]
    rows, flagged, loops = [], 0, []
    stages = Stages("registers", len(kernels))
    for label, kernel, types, constexprs in kernels:
        fn, candidates = _candidates(kernel)
        stages.start(f"{label}: {len(candidates)} candidate(s)")
        for cand, extra, warps, num_stages in candidates:
            try:
                r = _compile(fn, types, {**constexprs, **extra}, warps, num_stages)
            except KeyError:
                raise  # this file's own tables lack an argument: a bug here, not a finding
            except Exception as err:  # a candidate that cannot compile is itself a finding
                rows.append(f"| {label} | {cand} | {warps} / {num_stages} | - | - | - | "
                            f"**does not compile**: {' '.join(str(err).split())[:120]} |")
                flagged += 1
                continue
            problems = [p for p, bad in (("spills", r["spill_stores"] or r["spill_loads"]),
                                         ("> 255 registers", r["regs"] > 255),
                                         ("shared memory over 227 KB", r["shared"] > SHARED_LIMIT))
                        if bad]
            flagged += bool(problems)
            if label.startswith("W4A16"):  # one group of codes per row and loop iteration
                body, i2f = _loop_instructions(r["cubin"])
                weights = extra["BLOCK_N"] * constexprs["GROUP"] / (32 * warps)
                loops.append(f"| {label} | {cand} | {warps} / {num_stages} | {body} | "
                             f"{weights:g} | {body / weights:.2f} | {i2f / weights:.2f} |")
            rows.append(f"| {label} | {cand} | {warps} / {num_stages} | {r['regs']} | "
                        f"{r['spill_stores']} / {r['spill_loads']} | {r['shared'] / 1024:.1f} | "
                        f"{'**' + ', '.join(problems) + '**' if problems else 'ok'} |")
    stages.finish()
    env = environment()
    env["trial_candidates"] = False  # every candidate is compiled; trials are marked per row
    lines = ["# registers, spills and shared memory on sm_90 (compiled offline)", "",
             f"- compiled on: {env['cpu']} (no GPU), target sm_90a",
             f"- versions: python {env['python']}, torch {env['torch']}, triton {env['triton']}",
             f"- date: {env['date']}, commit {env['git_commit']}", f"- command: `{env['command']}`",
             f"- {len(rows)} variants, {flagged} flagged (spills, > 255 registers, shared memory "
             "over 227 KB, or not compiling)", "",
             "| kernel | candidate | warps / stages | registers | spill bytes (st / ld) | "
             "shared KB | verdict |", "|---|---|---|---|---|---|---|", *rows, ""]
    if loops:  # W4A16 is bound by instruction issue once its bytes are few (issue 16)
        lines += ["## W4A16 main loop in SASS", "",
                  "Instructions a thread issues per iteration of the main loop, per weight it "
                  "dequantizes there, and how many of them are integer-to-float conversions "
                  "(quarter rate on an H100).", "",
                  "| kernel | candidate | warps / stages | loop instructions | weights per thread "
                  "| instructions per weight | I2F per weight |", "|---|---|---|---|---|---|---|",
                  *loops, ""]
    path = result_stem("registers", env, "sm90").with_suffix(".md")
    write_text(path, "\n".join(lines))
    print("\n".join(lines))
    return path
