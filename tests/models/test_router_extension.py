"""The raw C++ router extensions (kcap._router_cpu, kcap._router_cuda) refuse every bad
argument with a clean TypeError/ValueError and never crash, and the CPU router survives a
fork. Each group of calls runs in a child process, so that a crash fails one test instead of
killing pytest."""
import json
import subprocess
import sys

import pytest
import torch

from kcap.models.router import cpp_available

# The child evaluates each call and prints one JSON line per call: ["ok", status] or
# [exception type, message].
REPORT = """
import json

def report(expr):
    try:
        outcome = ["ok", eval(expr)]
    except Exception as err:
        outcome = [type(err).__name__, str(err)]
    print(json.dumps(outcome), flush=True)
"""

CPU_PRELUDE = REPORT + """
import numpy as np
from kcap import _router_cpu as ext

T, E, k, block = 16, 4, 2, 4
n = T * k
a = dict(logits=np.random.default_rng(0).standard_normal((T, E)).astype(np.float32),
         expert=np.empty(n, np.int64), gate=np.empty(n, np.float32), dropped=np.empty(n, np.uint8),
         prob_sum=np.empty(E), counts=np.empty(E, np.int64), offsets=np.empty(E + 1, np.int64),
         perm=np.empty(n, np.int64), inverse=np.empty(n, np.int64),
         padded_perm=np.empty(n + E * (block - 1), np.int64),
         block_expert=np.empty((n + E * (block - 1)) // block, np.int64), scalars=np.empty(4))

def call(**changes):
    args = dict(dtype=0, T=T, E=E, k=k, capacity=-1, block=block, threads=2, **a)
    args.update(changes)
    return ext.route(**args)
"""

# (call, expected outcome, expected status or message fragment), by class of mistake.
CPU_CASES = {
    "valid": [
        ("call()", "ok", 0),
        ("call(T=0)", "ok", 0),
        ("call(threads=2**31 - 1)", "ok", 0),  # capped: libgomp used to abort the process
        ("call(logits=np.full((T, E), np.nan, np.float32))", "ok", 1),  # NON_FINITE
        ("call(logits=np.frombuffer(a['logits'].tobytes(), np.float32).reshape(T, E))", "ok", 0),
        ("call(perm=a['inverse'], inverse=a['perm'])", "ok", 0),  # same type and size: no crash
    ],
    "too small": [
        ("call(logits=np.zeros((T, E - 1), np.float32))", "ValueError",
         "logits holds 48 items, needs at least 64"),
        ("call(expert=np.empty(n - 1, np.int64))", "ValueError", "expert holds 31 items"),
        ("call(dropped=np.empty(3, np.uint8))", "ValueError", "dropped holds 3 items"),
        ("call(offsets=np.empty(E, np.int64))", "ValueError", "offsets holds 4 items, needs at least 5"),
        ("call(padded_perm=np.empty(n, np.int64))", "ValueError", "padded_perm holds 32 items, needs at least 44"),
        ("call(block_expert=np.empty(1, np.int64))", "ValueError", "block_expert holds 1 items"),
        ("call(scalars=np.empty(3))", "ValueError", "scalars holds 3 items"),
    ],
    "wrong item type": [
        ("call(logits=a['logits'].astype(np.float64))", "TypeError", "logits must hold float32"),
        ("call(dtype=1)", "TypeError", "logits must hold float16"),
        ("call(dtype=2, logits=a['logits'].astype(np.float16))", "TypeError", "bfloat16"),
        ("call(expert=a['expert'].astype(np.int32))", "TypeError", "expert must hold int64"),
        ("call(counts=np.empty(E, np.uint64))", "TypeError", "counts must hold int64"),
        ("call(expert=a['expert'].astype('>i8'))", "TypeError", "expert must hold int64"),
        ("call(dropped=np.empty(n, np.bool_))", "TypeError", "dropped must hold uint8"),
        ("call(prob_sum=np.empty(E, np.float32))", "TypeError", "prob_sum must hold float64"),
    ],
    "not contiguous, read-only or misaligned": [
        ("call(logits=np.zeros((E, T), np.float32).T)", "ValueError", "logits must be C-contiguous"),
        ("call(inverse=np.empty(2 * n, np.int64)[::2])", "ValueError", "inverse must be C-contiguous"),
        ("call(gate=np.frombuffer(bytes(4 * n), np.float32))", "ValueError", "gate is read-only"),
        ("call(expert=np.frombuffer(bytearray(8 * n + 1), np.uint8)[1:].view(np.int64))",
         "ValueError", "expert is not aligned"),
    ],
    "not a buffer": [
        ("call(expert=0)", "TypeError", "expert must be a buffer of int64"),
        ("call(expert=a['expert'].ctypes.data)", "TypeError", "expert must be a buffer"),  # a raw pointer
        ("call(logits=None)", "TypeError", "logits must be a buffer"),
        ("call(gate='abc')", "TypeError", "gate must be a buffer"),
        ("call(scalars=[0.0] * 4)", "TypeError", "scalars must be a buffer"),
    ],
    "bad sizes": [
        ("call(dtype=3)", "ValueError", "dtype must be 0"),
        ("call(T=-1)", "ValueError", "T must be >= 0"),
        ("call(E=0)", "ValueError", "E must be >= 1"),
        ("call(k=0)", "ValueError", "k must be in [1, E=4]"),
        ("call(k=E + 1)", "ValueError", "k must be in [1, E=4]"),
        ("call(k=2**62)", "ValueError", "k must be in"),
        ("call(block=0)", "ValueError", "block must be >= 1"),
        ("call(threads=-1)", "ValueError", "threads must be >= 0"),
        ("call(T=2**40)", "ValueError", "logits holds 64 items"),
        ("call(T=2**62)", "ValueError", "overflow"),
        ("call(block=2**40)", "ValueError", "padded_perm holds"),
        ("call(block=2**62)", "ValueError", "overflow"),
        ("call(T=0, E=2**62, k=1, block=1)", "ValueError", "prob_sum holds 4 items"),
        ("call(T=2**64)", "TypeError", "incompatible function arguments"),  # not an int64
    ],
    "swapped or overlapping outputs": [
        ("call(expert=a['gate'], gate=a['expert'])", "TypeError", "expert must hold int64"),
        ("call(dropped=a['expert'], expert=a['dropped'])", "TypeError", "expert must hold int64"),
        ("call(perm=a['expert'])", "ValueError", "expert and perm overlap"),
        ("call(gate=a['logits'].reshape(-1)[:n])", "ValueError", "logits and gate overlap"),
        ("call(counts=a['offsets'][1:])", "ValueError", "counts and offsets overlap"),
    ],
}


def outcomes(prelude: str, calls: list[str]) -> list:
    """Runs the calls in one child process; a crash (or hang) fails, naming the call."""
    script = prelude + "".join(f"\nreport({c!r})" for c in calls)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, (f"the child died (exit {proc.returncode}) at call {len(lines)}: "
                                  f"{calls[min(len(lines), len(calls) - 1)]}\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in lines]


def check(prelude, cases):
    got = outcomes(prelude, [call for call, _, _ in cases])
    assert len(got) == len(cases)
    for (call, kind, expected), (got_kind, detail) in zip(cases, got):
        assert got_kind == kind, f"{call}: {got_kind}: {detail}"
        if kind == "ok":
            assert detail == expected, f"{call}: status {detail}"
        else:
            assert expected in detail, f"{call}: {detail}"
            assert "\n" not in detail or "incompatible" in detail, f"{call}: not one line: {detail}"


@pytest.mark.skipif(not cpp_available("cpu"), reason="C++ router not built")
@pytest.mark.parametrize("group", list(CPU_CASES))
def test_cpu_extension_refuses_bad_arguments_cleanly(group):
    check(CPU_PRELUDE, CPU_CASES[group])


FORK_CHILD = """
import os, signal, sys
import torch
from kcap.models.router import route

torch.set_num_threads(2)  # an OpenMP team in this process, whatever the machine's cores
logits = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
before = route(logits, 2, impl="cpp")
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a hung child is killed instead of outliving the test
    after = route(logits, 2, impl="cpp")
    same = torch.equal(after.perm, before.perm) and torch.equal(after.gate, before.gate)
    os._exit(0 if same else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not cpp_available("cpu"), reason="C++ router not built")
def test_cpu_router_runs_in_a_forked_child():
    from kcap import _router_cpu

    if not _router_cpu.has_openmp():
        pytest.skip("built without OpenMP: no thread pool to lose in fork")
    proc = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the forked child hung or failed (exit {proc.returncode}): {proc.stderr[-2000:]}"


CUDA_PRELUDE = REPORT + """
import numpy as np
from kcap import _router_cuda as ext

T, E, k, block = 16, 4, 2, 4
n = T * k
MAX_BLOCKS = -(-n // block) + E
_keep = []

class Fake:
    \"\"\"An array description over host memory (a real, distinct address, never touched).\"\"\"
    def __init__(self, items, typestr="<i8", strides=None, readonly=False, ptr=None, **extra):
        if ptr is None:
            _keep.append(np.empty(max(items, 1) * int(typestr[2:]), np.uint8))
            ptr = _keep[-1].ctypes.data
        self.__cuda_array_interface__ = dict(typestr=typestr, shape=(items,), strides=strides,
                                             data=(ptr, readonly), version=2, **extra)

class Raw:
    def __init__(self, cai):
        self.__cuda_array_interface__ = cai

SPECS = dict(logits=(T * E, "<f4"), expert=(n, "<i8"), gate=(n, "<f4"), zterm=(T, "<f4"),
             bad=(T, "|u1"), dropped=(n, "|u1"), hist=(E, "<i8"), base=(E, "<i8"), total=(E, "<i8"),
             counts=(E, "<i8"), offsets=(E + 1, "<i8"), pad_offsets=(E + 1, "<i8"),
             perm=(n, "<i8"), inverse=(n, "<i8"), padded=(MAX_BLOCKS * block, "<i8"),
             block_expert=(MAX_BLOCKS, "<i8"), sizes=(3, "<i8"), status=(1, "<i8"))
a = {name: Fake(items, typestr) for name, (items, typestr) in SPECS.items()}

def call(**changes):
    args = dict(dtype=0, T=T, E=E, k=k, capacity=-1, block=block, max_blocks=MAX_BLOCKS, stream=0, **a)
    args.update(changes)
    return ext.route_cuda(**args)
"""

# Checks that come before any CUDA call: they run on machines without a GPU too.
CUDA_CASES = [
    ("call(expert=np.empty(n, np.int64))", "TypeError", "expert must be a CUDA array"),
    ("call(expert=0)", "TypeError", "expert must be a CUDA array"),
    ("call(logits=Raw(5))", "TypeError", "must be a dict"),
    ("call(logits=Raw(dict(typestr='<f4', shape=(T * E,))))", "TypeError", "has no 'data'"),
    ("call(expert=Fake(n, ptr=-8))", "TypeError", "['data'] has the wrong type"),
    ("call(expert=Fake(n - 1))", "ValueError", "expert holds 31 items"),
    ("call(hist=Fake(E - 1))", "ValueError", "hist holds 3 items"),
    ("call(gate=Fake(n, '<f8'))", "TypeError", "gate must hold float32"),
    ("call(dtype=2)", "TypeError", "logits must hold 16-bit integer (bfloat16 bits)"),
    ("call(logits=Fake(T * E, '<f4', strides=(8,)))", "ValueError", "logits must be C-contiguous"),
    ("call(expert=Fake(n, readonly=True))", "ValueError", "expert is read-only"),
    ("call(expert=Fake(n, ptr=a['expert'].__cuda_array_interface__['data'][0] + 4))",
     "ValueError", "expert is not aligned"),
    ("call(expert=Fake(n, mask=a['dropped']))", "ValueError", "expert must not be masked"),
    ("call(perm=a['expert'])", "ValueError", "expert and perm overlap"),
    ("call(max_blocks=MAX_BLOCKS - 1)", "ValueError", "max_blocks must be >= ceil(T*k/block) + E = 12"),
    ("call(E=2000)", "ValueError", "E must be in [1, 1024]"),
    ("call(k=E + 1)", "ValueError", "k must be in [1, E=4]"),
    ("call(T=-1)", "ValueError", "T must be >= 0"),
    ("call(block=0)", "ValueError", "block must be >= 1"),
    ("call(T=2**62)", "ValueError", "overflow"),
    ("call(dtype=-1)", "ValueError", "dtype must be 0"),
]


@pytest.mark.skipif(not cpp_available("cuda"), reason="CUDA router not built (no nvcc)")
def test_cuda_extension_refuses_bad_arguments_before_any_cuda_call():
    check(CUDA_PRELUDE, CUDA_CASES)


@pytest.mark.skipif(not cpp_available("cuda"), reason="CUDA router not built (no nvcc)")
def test_cuda_extension_refuses_host_memory():
    # Well-formed descriptions of host memory: "no usable CUDA device" without a GPU, "not
    # CUDA device memory" with one; never a launch.
    (kind, detail), = outcomes(CUDA_PRELUDE, ["call()"])
    expected = {"ValueError": "is not CUDA device memory", "RuntimeError": "no usable CUDA device"}
    assert kind in expected and expected[kind] in detail, f"{kind}: {detail}"


GPU_PRELUDE = CUDA_PRELUDE + """
import torch
DTYPES = {"<f4": torch.float32, "<i8": torch.int64, "|u1": torch.uint8}
a = {name: torch.empty(items, dtype=DTYPES[t], device="cuda") for name, (items, t) in SPECS.items()}
a["logits"].normal_()
"""


@pytest.mark.skipif(not (torch.cuda.is_available() and cpp_available("cuda")),
                    reason="needs a GPU and the CUDA router")
def test_cuda_extension_checks_device_memory():
    check(GPU_PRELUDE, [
        ("call()", "ok", 0),
        ("call(expert=Fake(n))", "ValueError", "expert is not CUDA device memory"),
        ("call(expert=a['expert'].cpu())", "TypeError", "expert must be a CUDA array"),
        ("call(expert=a['expert'][:-1])", "ValueError", "expert holds 31 items"),
        ("call(gate=a['gate'].double())", "TypeError", "gate must hold float32"),
        ("call(logits=torch.zeros(E, T, device='cuda').t())", "ValueError", "logits must be C-contiguous"),
        ("call(expert=a['dropped'], dropped=a['expert'])", "TypeError", "expert must hold int64"),
    ])
