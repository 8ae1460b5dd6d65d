"""SubmititExecutor: a sweep's jobs as one Slurm job array, through submitit.

Same interface as LocalExecutor (start / wait / running / close, see executors.py), plus
``states()`` for a status command. Each job runs in a Slurm task through ``run_job``, so it
leaves the same job-result.json / job-error.json in its folder as under the local executor.

A job is wrapped in a submitit Checkpointable: when Slurm preempts a task or its time limit
comes, submitit requeues the same call and the job resumes from the checkpoints in its own
folder (the wrapper holds no state worth saving). ``cluster="local"`` runs the tasks as local
processes through submitit (the tests), ``cluster="debug"`` runs them inside ``wait``.
"""
from __future__ import annotations

import time
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

from kcap.experiments.executors import Outcome, check_jobs, check_timeout, recorded_error
from kcap.experiments.worker import clear_outcome, run_job

# submitit's options shared by its executors, then Slurm-only ones (its local executor
# ignores those); update_parameters takes them all
PARAMETERS = frozenset({
    "timeout_min", "mem_gb", "cpus_per_task", "gpus_per_node", "name",
    "slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint", "slurm_exclude",
    "slurm_array_parallelism", "slurm_signal_delay_s", "slurm_setup",
    "slurm_additional_parameters"})
# the executor's constructor takes this one: how many time limits a task may be requeued after
CONSTRUCTOR = frozenset({"slurm_max_num_timeout"})
CLUSTERS = (None, "slurm", "local", "debug")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit's local executor otherwise kills a task at 2 min


class _Task(Checkpointable):
    """A job as submitit calls it. Checkpointable's default ``checkpoint`` resubmits this same
    call, which is what a job that resumes from its own folder needs."""

    def __init__(self, job, threads: int | None, raise_errors: bool):
        self.job, self.threads, self.raise_errors = job, threads, raise_errors

    def __call__(self):
        try:
            return run_job(self.job, self.threads)
        except Exception:
            if self.raise_errors:  # submitit records the failure, and Slurm's state says FAILED
                raise
            return None  # "debug": submitit would open pdb on it; job-error.json has it


class SubmititExecutor:
    """Runs jobs through submitit; ``start`` submits its jobs as one job array.

    folder: where submitit keeps its pickles and logs (one sub-folder per Slurm job).
    cluster: None takes what submitit detects (Slurm when available, else local processes),
    "slurm" insists on Slurm, "local" and "debug" are submitit's local and in-process executors.
    slurm_options: see PARAMETERS and CONSTRUCTOR; timeout_min (minutes) is required on Slurm,
    where submitit's default is 5. cpus_per_task also sets each run's torch threads."""

    def __init__(self, folder, cluster: str | None = None, **slurm_options):
        if cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {CLUSTERS}, got {cluster!r}")
        unknown = set(slurm_options) - PARAMETERS - CONSTRUCTOR
        if unknown:
            raise ValueError(f"unknown Slurm options {sorted(unknown)}; allowed: "
                             f"{sorted(PARAMETERS | CONSTRUCTOR)}")
        options = dict(slurm_options)
        first = {k: options.pop(k) for k in CONSTRUCTOR if k in options}
        self._executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=cluster,
                                               **first)
        self.cluster = self._executor.cluster
        if "timeout_min" not in options:
            if self.cluster == "slurm":
                raise ValueError("timeout_min is required on Slurm (submitit's default is 5 "
                                 "minutes)")
            options["timeout_min"] = LOCAL_TIMEOUT_MIN
        try:
            self._executor.update_parameters(**options)
        except AssertionError as exc:  # submitit checks the shared options' types with assert
            raise TypeError(str(exc).strip()) from None
        self._threads = options.get("cpus_per_task")
        self.gpus_per_node = options.get("gpus_per_node")  # the runner packs runs on GPUs
        # wait() polls done(), a stat of each result file (sacct at most every few minutes)
        self._poll_s = 0.1 if self.cluster in ("local", "debug") else 2.0
        self._pending: dict[str, tuple] = {}  # name -> (job, submitit job), not yet reported
        self._submitted: dict[str, object] = {}  # name -> its latest submitit job

    def start(self, jobs: list) -> None:
        jobs = check_jobs(jobs, set(self._pending))
        if not jobs:
            return  # submitit warns about an empty array
        for job in jobs:
            Path(job.folder).mkdir(parents=True, exist_ok=True)
            clear_outcome(job.folder)
        tasks = [_Task(job, self._threads, self.cluster != "debug") for job in jobs]
        for job, sjob in zip(jobs, self._executor.submit_array(tasks)):
            self._pending[job.name] = (job, sjob)
            self._submitted[job.name] = sjob

    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes of the jobs that finished, as soon as there is one or after ``timeout``
        seconds. A task that Slurm killed (memory, node failure) is only seen when submitit
        next asks sacct; "debug" runs the jobs here, whatever the timeout."""
        deadline = time.monotonic() + check_timeout(timeout)
        while True:
            outcomes = []
            for name, (job, sjob) in list(self._pending.items()):
                if sjob.done():
                    del self._pending[name]
                    outcomes.append(_outcome(job, sjob))
            left = deadline - time.monotonic()
            if outcomes or not self._pending or left <= 0:
                return outcomes
            time.sleep(min(self._poll_s, left))

    def running(self) -> list:
        """Jobs submitted and not yet reported (on Slurm some may still wait in the queue)."""
        return [job for job, _ in self._pending.values()]

    def states(self) -> dict[str, str]:
        """Job name -> submitit's state of its latest task (on Slurm, sacct's: PENDING,
        RUNNING, COMPLETED, FAILED, TIMEOUT ...; locally RUNNING, FINISHED, INTERRUPTED)."""
        return {name: _state(sjob) for name, sjob in self._submitted.items()}

    def close(self) -> None:
        """Cancel the jobs not yet reported."""
        pending, self._pending = list(self._pending.values()), {}
        for _, sjob in pending:
            try:
                sjob.cancel(check=False)
            except Exception:  # it ended meanwhile, or scancel is unreachable: nothing to stop
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _state(sjob) -> str:
    try:
        return str(sjob.state)
    except Exception:  # sacct unreachable: say so rather than fail a status command
        return "UNKNOWN"


def _outcome(job, sjob) -> Outcome:
    try:
        exc = sjob.exception()
        value = sjob.result() if exc is None else None
    except Exception as error:  # no result at all: cancelled, killed, node lost
        exc, value = error, None
    if exc is None and isinstance(value, dict):
        return Outcome(job, True, value, None)
    # the worker's own one line first: submitit's error is the whole traceback
    error = recorded_error(Path(job.folder)) or _one_line(exc)
    return Outcome(job, False, None, f"{error} (see {sjob.paths.stderr})")


def _one_line(exc) -> str:
    """A submitit error on one line: the last line of the job's traceback when it quotes one
    (FailedJobError does, between dashed lines), else the first line of the message."""
    if exc is None:
        return "the job returned no result"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    rules = [k for k, line in enumerate(lines) if set(line) == {"-"}]
    if len(rules) >= 2 and rules[1] > rules[0] + 1:
        return lines[rules[1] - 1]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
