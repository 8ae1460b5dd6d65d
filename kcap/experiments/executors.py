"""Executors: run a sweep's jobs, each in a process of its own (local) or a Slurm task.

A job is any picklable object with ``name`` (unique in the sweep), ``folder`` (its run folder)
and ``__call__() -> dict`` (does the work, resuming from its own checkpoints when restarted).
An executor only runs jobs and reports an ``Outcome`` for each; the retry policy and the
progress display belong to the runner.

LocalExecutor starts one ``python -m kcap.experiments.worker`` per job on a fixed set of slots
(a GPU index or "cpu"). One process per run because a run that crashes, runs out of memory or
breaks its CUDA context must take down that run only, and because the device
(CUDA_VISIBLE_DEVICES) and the CPU thread count must be set before torch is imported. Threads
are pinned per process: several torch processes that each take every core run many times
slower than the same processes sharing the cores out.

SubmititExecutor (kcap/experiments/submitit_executor.py, importable from here too) hands the
same jobs to submitit as one Slurm job array.
"""
from __future__ import annotations

import ctypes
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from kcap.atomic import atomic_path
from kcap.experiments.worker import (ERROR_FILE, JOB_FILE, LOG_FILE, RESULT_FILE, THREADS_ENV,
                                     clear_outcome)

_POLL_S = 0.05  # a child's exit is noticed within this; polling costs nothing measurable


@dataclass
class Outcome:
    """How a job ended: its value when ``ok``, else a one-line error naming the full log."""
    job: object
    ok: bool
    value: dict | None
    error: str | None


def check_jobs(jobs, busy: set[str]) -> list:
    """The jobs as a list, refused (TypeError/ValueError) if one lacks the job protocol or
    reuses a name that is queued or running."""
    if isinstance(jobs, (str, bytes)) or not hasattr(jobs, "__iter__"):
        raise TypeError(f"jobs must be a list of jobs, got {type(jobs).__name__}")
    jobs, names = list(jobs), set(busy)
    for job in jobs:
        name = getattr(job, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"a job needs a non-empty str name, got {job!r}")
        if not isinstance(getattr(job, "folder", None), (str, os.PathLike)) or not callable(job):
            raise TypeError(f"job {name} needs a folder path and a __call__")
        if name in names:
            raise ValueError(f"job name {name} is used twice (queued, running or in this list)")
        names.add(name)
    return jobs


def check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
    if not timeout >= 0:  # NaN too
        raise ValueError(f"timeout must be >= 0, got {timeout}")
    return float(timeout)


def recorded_error(folder: Path) -> str | None:
    """The one-line error the worker recorded in ``folder``, if any."""
    try:
        return json.loads((folder / ERROR_FILE).read_text())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- local processes ---------------------------------------------------------------------

def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:  # loaded now: preexec_fn runs between fork and exec, where loading a library can hang
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int):
    """A preexec_fn: the child gets SIGTERM when its parent dies, even of SIGKILL, so that a
    killed sweep leaves no orphan runs holding GPUs. (Linux; the signal comes when the thread
    that started the child ends, so start and wait from one long-lived thread.)"""
    def preexec():
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)
    return preexec


def _cpu_count() -> int:
    try:  # the cores this process may use (taskset, cgroup cpusets), not the machine's
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _default_slots() -> list[str]:
    import torch  # only here: an executor given its slots never needs torch

    if torch.cuda.is_available():
        return [str(k) for k in range(torch.cuda.device_count())]
    return ["cpu"] * max(1, _cpu_count() // 2)


def _slot_device(slot) -> str:
    """CUDA_VISIBLE_DEVICES for a child on ``slot``: "" for "cpu" (the run must not take a
    GPU), else the parent's k-th visible GPU, so that "1" means the parent's cuda:1."""
    if not isinstance(slot, str):
        raise TypeError(f"a slot must be a str ('cpu' or a GPU index), got {slot!r}")
    if slot == "cpu":
        return ""
    if not re.fullmatch(r"[0-9]+", slot):
        raise ValueError(f"a slot must be 'cpu' or a GPU index such as '0', got {slot!r}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return slot
    gpus = [g.strip() for g in visible.split(",") if g.strip()]
    if int(slot) >= len(gpus):
        raise ValueError(f"GPU slot {slot}: CUDA_VISIBLE_DEVICES={visible!r} shows "
                         f"{len(gpus)} GPU(s)")
    return gpus[int(slot)]


@dataclass
class _Child:
    job: object
    slot: int
    process: subprocess.Popen


class LocalExecutor:
    """Runs jobs as child processes, one per slot at a time, first queued first started.

    slots: one entry per concurrent run: "cpu" or a GPU index ("0"; repeat it to share a GPU).
    Default: each visible GPU once, else one CPU slot per two cores. threads: CPU threads per
    run (default: the usable cores divided by the number of slots)."""

    def __init__(self, slots: list[str] | None = None, threads: int | None = None):
        slots = _default_slots() if slots is None else slots
        if not isinstance(slots, (list, tuple)):
            raise TypeError(f"slots must be a list of str, got {type(slots).__name__}")
        if not slots:
            raise ValueError("slots must name at least one slot")
        self._devices = [_slot_device(s) for s in slots]
        if threads is None:
            threads = max(1, _cpu_count() // len(slots))
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise TypeError(f"threads must be an int, got {threads!r}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.slots, self.threads = list(slots), threads
        self._queue: deque = deque()
        self._children: dict[int, _Child] = {}  # slot index -> its running child
        self._finished: list[Outcome] = []
        self._closed = False

    def start(self, jobs: list) -> None:
        """Queue ``jobs``; each is pickled into its folder now (an unpicklable job fails here,
        not later) and starts when a slot is free."""
        if self._closed:
            raise RuntimeError("this executor is closed")
        jobs = check_jobs(jobs, {j.name for j in self._queue} | {j.name for j in self.running()})
        blobs = [pickle.dumps(job) for job in jobs]
        for job, blob in zip(jobs, blobs):
            with atomic_path(Path(job.folder).absolute() / JOB_FILE) as tmp:
                tmp.write_bytes(blob)
            self._queue.append(job)
        self._fill()

    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes of the jobs that finished, returned as soon as there is one or when
        ``timeout`` seconds have passed (then possibly none); freed slots take queued jobs."""
        deadline = time.monotonic() + check_timeout(timeout)
        while True:
            self._reap()
            self._fill()
            left = deadline - time.monotonic()
            if self._finished or not self._children or left <= 0:
                break
            time.sleep(min(_POLL_S, left))
        outcomes, self._finished = self._finished, []
        return outcomes

    def running(self) -> list:
        return [self._children[k].job for k in sorted(self._children)]

    def close(self, grace: float = 5.0) -> None:
        """Drop the queue and stop the running children: SIGTERM, then SIGKILL for those
        still alive after ``grace`` seconds. The signal goes to each child's process group,
        so what a run started itself stops too."""
        self._closed = True
        self._queue.clear()
        self._finished = []
        children, self._children = list(self._children.values()), {}
        for child in children:
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child.process, signal.SIGKILL)
                child.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _fill(self) -> None:
        free = [k for k in range(len(self.slots)) if k not in self._children]
        while self._queue and free:
            job, slot = self._queue.popleft(), free[0]
            try:
                self._children[slot] = _Child(job, slot, self._launch(job, slot))
                free.pop(0)
            except OSError as exc:  # no such interpreter, fork refused: this job fails
                self._finished.append(Outcome(job, False, None, f"could not start worker: {exc}"))

    def _launch(self, job, slot: int) -> subprocess.Popen:
        folder = Path(job.folder).absolute()
        clear_outcome(folder)
        threads = str(self.threads)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=self._devices[slot], OMP_NUM_THREADS=threads,
                   MKL_NUM_THREADS=threads, **{THREADS_ENV: threads})
        with open(folder / LOG_FILE, "ab") as log:  # appended: a retried run keeps its history
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.name} on slot "
                      f"{self.slots[slot]} ({threads} threads)\n".encode())
            log.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "kcap.experiments.worker", str(folder / JOB_FILE)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=os.getcwd(), preexec_fn=_die_with_parent(os.getpid()),
                # its own process group: close() stops the run's own children too, and a
                # Ctrl-C in the terminal reaches the runner only, which decides what stops
                process_group=0)

    def _reap(self) -> None:
        for slot, child in list(self._children.items()):
            code = child.process.poll()
            if code is not None:
                del self._children[slot]
                self._finished.append(_local_outcome(child.job, code))


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the pid is not reused before wait() reaps it
    except ProcessLookupError:
        pass


def _local_outcome(job, code: int) -> Outcome:
    folder = Path(job.folder).absolute()
    log = folder / LOG_FILE
    if code == 0:
        try:
            return Outcome(job, True, json.loads((folder / RESULT_FILE).read_text()), None)
        except (OSError, ValueError) as exc:
            return Outcome(job, False, None, f"worker exited 0 but its result is unreadable "
                                             f"({type(exc).__name__}) (see {log})")
    error = recorded_error(folder)
    if error is None and code < 0:
        try:
            name = f", {signal.Signals(-code).name}"
        except ValueError:
            name = ""
        error = f"worker exited with signal {-code}{name}"
    elif error is None:
        error = f"worker exited with code {code}"
    return Outcome(job, False, None, f"{error} (see {log})")


def make_executor(kind: str, folder, **options):
    """An executor of ``kind`` "local" (LocalExecutor(**options); ``folder`` is unused, each
    run logs in its own) or "slurm" (SubmititExecutor(folder, **options), cluster "slurm"
    unless the options name another)."""
    if kind == "local":
        return LocalExecutor(**options)
    if kind == "slurm":
        from kcap.experiments.submitit_executor import SubmititExecutor

        options.setdefault("cluster", "slurm")  # not submitit's silent fallback to local
        return SubmititExecutor(folder, **options)
    raise ValueError(f"executor kind must be 'local' or 'slurm', got {kind!r}")


def __getattr__(name: str):
    # SubmititExecutor is importable from here, but submitit is imported only when it is used
    if name == "SubmititExecutor":
        from kcap.experiments.submitit_executor import SubmititExecutor
        return SubmititExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
