"""Run one pickled job in this process and leave its outcome as a file beside it.

    python -m kcap.experiments.worker <run folder>/job.pkl

The local executor starts one such process per run (the Slurm path calls ``run_job`` inside
submitit's own worker). A run gets a process of its own so that a crash, an out-of-memory kill
or a CUDA error takes down that run only, and so that the device and thread count it was given
(CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS) are fixed before torch is first imported.

The outcome is a file, not an exit status alone, so that the parent can tell "the job raised"
(job-error.json, with its message and traceback) from "the process died" (neither file), and so
that it survives the parent: a restarted sweep can read what finished while it was away.

    success: <folder>/job-result.json  the job's return value (a JSON-able dict); exit 0
    failure: <folder>/job-error.json   {"error": "<Type>: <message>", "traceback": "..."}; exit 1

Both are written atomically (temporary file, then rename), so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import time
import traceback
from pathlib import Path

from kcap.atomic import write_json

JOB_FILE = "job.pkl"
RESULT_FILE = "job-result.json"
ERROR_FILE = "job-error.json"
LOG_FILE = "worker.log"
# the executor passes the thread count through this variable as well as OMP_NUM_THREADS,
# so that the worker can tell a count chosen for it from one the user exported
THREADS_ENV = "KCAP_WORKER_THREADS"


def pin_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in this process (None: leave the count alone).

    Several runs share a machine's cores; torch's default (one thread per core in every
    process) oversubscribes them and makes each run many times slower. The environment
    variables cover torch and BLAS libraries imported later; torch.set_num_threads covers a
    torch that the job's module has already imported (it is not imported here for nothing)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def error_summary(exc: BaseException) -> str:
    """``<Type>: <first line of the message>``, on one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def clear_outcome(folder) -> None:
    """Remove the outcome files of an earlier attempt, so that they are not read as this one's."""
    for name in (RESULT_FILE, ERROR_FILE):
        try:
            os.unlink(Path(folder) / name)
        except FileNotFoundError:
            pass


def _record_error(folder: Path, exc: BaseException) -> None:
    write_json(folder / ERROR_FILE, {"error": error_summary(exc),
                                      "traceback": traceback.format_exc(),
                                      "time": time.time()})


def run_job(job, threads: int | None = None) -> dict:
    """Call ``job()`` and record its outcome in ``job.folder``; returns the job's value.

    An exception is recorded in job-error.json and raised again (for submitit, which records
    it too). The value must be a dict that JSON can write."""
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    clear_outcome(folder)
    try:
        pin_threads(threads)
        value = job()
        if not isinstance(value, dict):
            raise TypeError(f"job {job.name} returned {type(value).__name__}, expected a dict")
        json.dumps(value)  # refuse a value JSON cannot write before anything is written
    except BaseException as exc:
        _record_error(folder, exc)
        raise
    write_json(folder / RESULT_FILE, value)
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m kcap.experiments.worker <folder>/job.pkl", file=sys.stderr)
        return 2
    path = Path(argv[0])
    threads = os.environ.get(THREADS_ENV)
    try:
        with open(path, "rb") as f:
            job = pickle.load(f)
        # the outcome must land where the parent looks for it: beside job.pkl
        if Path(job.folder).resolve() != path.parent.resolve():
            raise ValueError(f"job {job.name}: folder {job.folder} is not the folder of {path}")
    except BaseException as exc:
        _record_error(path.parent, exc)
        traceback.print_exc()
        return 1
    print(f"[kcap worker] pid {os.getpid()} running {job.name}", flush=True)
    try:
        run_job(job, int(threads) if threads else None)
    except BaseException:  # KeyboardInterrupt and SystemExit too: the run did not finish
        traceback.print_exc()
        return 1
    print(f"[kcap worker] {job.name} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
