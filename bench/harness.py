"""Shared benchmark harness: timing, environment record, result files.

Every result file names the device, library versions, date, git commit and command, and
holds ratios against a baseline measured in the same run, never absolute claims carried
over from another machine. Timings here are wall clock on CPU; the kernel benchmarks add
CUDA timing (triton.testing.do_bench) when a GPU is present.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kcap.atomic import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Where and with what a result was measured."""
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, "-m", "bench"] + sys.argv[1:]),
           "python": platform.python_version(), "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    # KCAP_GIT_COMMIT names the commit where the tree was copied with a stale .git (the lent
    # GPU machine got the session's first commit, not the one measured)
    env["git_commit"] = os.environ.get("KCAP_GIT_COMMIT")
    if not env["git_commit"]:
        try:
            env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                               text=True, cwd=RESULTS.parent, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["git_commit"] = None
    for module in ("numpy", "torch", "triton"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    # trial candidates in the autotuning lists (kernels/runtime.py): the file says so
    env["trial_candidates"] = os.environ.get("KCAP_TRIAL_CANDIDATES", "0") == "1"
    env["device"] = env["cpu"]
    try:
        import torch
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return env


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Stages:
    """Progress of a benchmark on stderr (stdout keeps the results): a line as each stage
    starts, with its number, what it measures, the time so far and an estimate of the time
    left (the mean duration of the stages done, times the stages left; rough when stages
    differ in size). ``weights`` (optional, one per stage) say how stages compare."""

    def __init__(self, subject: str, total: int, weights=None):
        if weights is not None and len(weights) != total:
            raise ValueError(f"weights must have one entry per stage ({total}), got {len(weights)}")
        self.subject, self.total = subject, total
        self.weights = list(weights) if weights is not None else [1.0] * total
        self.started = 0
        self.begin = time.perf_counter()

    def start(self, what: str) -> None:
        elapsed = time.perf_counter() - self.begin
        done = sum(self.weights[:self.started])
        if done:
            eta = f"about {_clock(elapsed / done * sum(self.weights[self.started:]))} left"
        else:
            eta = "time left known after the first stage"
        self.started += 1
        print(f"[bench {self.subject} {self.started}/{self.total}] {what} (elapsed "
              f"{_clock(elapsed)}, {eta})", file=sys.stderr, flush=True)

    def finish(self) -> None:
        print(f"[bench {self.subject}] {self.started} stages in "
              f"{_clock(time.perf_counter() - self.begin)}", file=sys.stderr, flush=True)


def time_wall(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_device() -> tuple[bool, object]:
    """(gpu?, timer) for a kernel benchmark. Without a GPU: say so, switch Triton to its
    interpreter (before any kernel module is imported) and time with the wall clock."""
    import torch

    if torch.cuda.is_available():
        return True, time_gpu
    print("no GPU: timing an interpreter-sized case on the CPU (checks the harness; the "
          "numbers are not a speed claim)")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return False, lambda fn: time_wall(fn, repeats=3)


def time_gpu(fn) -> float:
    """Median seconds of ``fn()`` on the GPU (triton.testing.do_bench: warm-up, L2 flush)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def time_gpu_graph(fn, calls: int = 20, repeats: int = 10) -> float:
    """Median seconds of one ``fn()`` replayed from a CUDA graph, so without the host's
    launch overhead (what a decoding loop under CUDA graphs pays). As in time_gpu, the L2
    cache is flushed before each call; a graph of the flushes alone is timed beside it and
    its time subtracted."""
    import torch

    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # autotune and allocate before capturing, on its stream
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        graphs.append(graph)

    def replay(graph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    for graph in graphs:
        replay(graph)
    pairs = [(replay(graphs[0]), replay(graphs[1])) for _ in range(repeats)]
    return statistics.median(t - flushes for t, flushes in pairs) / calls


def autotune_choices(step, *modules) -> list[dict]:
    """What Triton's autotuner chose, and every candidate's time, when one ``step()`` tuned
    the autotuned kernels of ``modules`` at this case's shapes: [{"kernel", "key" (the tuning
    key's values), "chosen", "ms" {candidate: median ms}}], one entry per kernel and key.

    Each kernel's cache is emptied first, so ``step`` tunes afresh (a kernel tuned at the
    same key by an earlier case would otherwise report nothing), and restored after with
    the new choices added. Without a GPU kernels keep one config and nothing is tuned: [].
    Which candidate wins where is what decides the autotuning lists (trials included,
    KCAP_TRIAL_CANDIDATES=1), so the benches keep it beside their timings."""
    import torch
    from triton.runtime.autotuner import Autotuner

    from kcap.kernels.runtime import describe

    kernels = {name.lstrip("_"): k for m in modules for name, k in vars(m).items()
               if isinstance(k, Autotuner)}
    found, saved = [], {}
    for name, kernel in kernels.items():
        saved[name] = kernel.cache
        # the autotuner times candidates one key at a time, then stores the winner under the
        # key: the times gathered since the last store belong to the key being stored
        pending: dict = {}

        class Recorder(dict):
            def __setitem__(self, key, cfg, name=name, kernel=kernel, pending=pending):
                super().__setitem__(key, cfg)
                found.append({"kernel": name, "key": dict(zip(kernel.keys, key)),
                              "chosen": describe(cfg),
                              "ms": {describe(c): float(t[0] if isinstance(t, (list, tuple)) else t)
                                     for c, t in pending.items()}})
                pending.clear()

        def timed(*args, config, _bench=kernel._bench, pending=pending, **meta):
            pending[config] = _bench(*args, config=config, **meta)
            return pending[config]

        kernel.cache, kernel._bench = Recorder(), timed
    try:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        for name, kernel in kernels.items():
            del kernel._bench  # the instance attribute: the class's method shows again
            kernel.cache = {**saved[name], **kernel.cache}
    return found


def peak_memory_mib(step) -> float:
    """MiB a call of ``step()`` allocates on the GPU at its peak, above what was allocated
    before it."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def markdown(subject: str, env: dict, rows: list[dict], baseline: str, notes=()) -> str:
    """A table of the rows with each one's ratio against the baseline provider, then the
    autotuner's choices (rows that carry them) and ``notes`` (lines of a Notes section)."""
    base = {r["case"]: r["throughput"] for r in rows if r["provider"] == baseline}
    memory_head = " peak MiB |" if any("peak_memory_mib" in r for r in rows) else ""
    lines = [f"# {subject}", "", f"- device: {env['device']} ({env['cpu_count']} CPUs)",
             f"- versions: python {env['python']}, numpy {env['numpy']}, torch {env['torch']}, "
             f"triton {env['triton']}", f"- date: {env['date']}, commit {env['git_commit']}",
             f"- command: `{env['command']}`"]
    if env.get("trial_candidates"):
        lines.append("- autotuning lists: with the trial candidates (KCAP_TRIAL_CANDIDATES=1); a "
                     "trial joins a list only after passing the GPU tests alone (-k every_autotune)")
    lines += ["", f"| case | provider | median s | throughput | vs {baseline} |" + memory_head,
              "|---|---|---|---|---|" + ("---|" if memory_head else "")]
    for r in rows:
        ratio = r["throughput"] / base[r["case"]] if r["case"] in base else float("nan")
        value = r["throughput"]
        shown = f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"
        memory = f" {r.get('peak_memory_mib', float('nan')):,.0f} |" if memory_head else ""
        lines.append(f"| {r['case']} | {r['provider']} | {r['median_s']:.6f} | "
                     f"{shown} {r['unit']} | {ratio:.2f}x |" + memory)
    tuned = [(r, t) for r in rows for t in r.get("autotune", [])]
    if tuned:
        lines += ["", "## Autotuning", "",
                  "What the autotuner chose for each kernel at each case (its key), and each "
                  "candidate's median time in its own timing (trials: KCAP_TRIAL_CANDIDATES=1).",
                  "", "| case | provider | kernel | key | chosen | candidates, fastest first (ms) |",
                  "|---|---|---|---|---|---|"]
        for r, t in tuned:
            key = " ".join(f"{k}={v}" for k, v in t["key"].items())
            times = " · ".join(f"{c}: {ms:.4g}" for c, ms in sorted(t["ms"].items(), key=lambda x: x[1]))
            lines.append(f"| {r['case']} | {r['provider']} | {t['kernel']} | {key} | {t['chosen']} | {times} |")
    if notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


QUICK = False  # set by `python -m bench ... --quick`


def result_stem(subject: str, env: dict, kind: str | None = None) -> Path:
    """bench/results/<subject>-<kind>-<date>, kind gpu or cpu from env unless given; a
    --quick run ends in -quick, so that a smoke run never overwrites the day's record, and
    a run with trial candidates in the autotuning lists in -trials."""
    kind = kind or ("gpu" if env["device"] != env["cpu"] else "cpu")
    tail = ("-quick" if QUICK else "") + ("-trials" if env.get("trial_candidates") else "")
    return RESULTS / f"{subject}-{kind}-{env['date'][:10]}{tail}"


def save(subject: str, rows: list[dict], baseline: str, env: dict | None = None,
         notes=()) -> Path:
    """Write bench/results/<subject>-<device>-<date>.json and .md (result_stem); return the
    json path. ``notes``: findings drawn from the rows, listed under the table."""
    env = env or environment()
    stem = result_stem(subject, env)
    write_json(stem.with_suffix(".json"), {"subject": subject, "environment": env,
                                           "baseline": baseline, "rows": rows, "notes": list(notes)})
    text = markdown(subject, env, rows, baseline, notes)
    write_text(stem.with_suffix(".md"), text)
    print(text)
    return stem.with_suffix(".json")
