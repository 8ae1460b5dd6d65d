"""Executors: jobs run in their own processes, at most one per slot, with their threads and
device set; failures (an exception, a signal) come back as one-line outcomes; children die
with close() and with their parent; the submitit path runs the same jobs as an array."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kcap.experiments import worker
from kcap.experiments.executors import LocalExecutor, Outcome, make_executor

from .executor_jobs import SleepJob

# the directory from which a worker process imports this package's executor_jobs module
JOBS_ROOT = Path(sys.modules[SleepJob.__module__].__file__).parents[SleepJob.__module__.count(".")]


@pytest.fixture(autouse=True)
def importable_jobs(monkeypatch):
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(JOBS_ROOT)] + ([path] if path else [])))


def collect(executor, count: int, limit: float = 30.0) -> dict[str, Outcome]:
    """Outcomes by job name, once ``count`` have come (fails after ``limit`` seconds)."""
    outcomes, deadline = {}, time.monotonic() + limit
    while len(outcomes) < count:
        assert time.monotonic() < deadline, f"only {sorted(outcomes)} finished in {limit} s"
        outcomes.update((o.job.name, o) for o in executor.wait(1.0))
    return outcomes


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left to an init that does not reap counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_file(path: Path, limit: float = 20.0) -> str:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {limit} s"
        time.sleep(0.05)
    return path.read_text()


def test_local_runs_each_job_in_a_slot_with_its_threads(tmp_path):
    jobs = [SleepJob(f"j{k}", tmp_path / f"j{k}", seconds=0.5) for k in range(3)]
    with LocalExecutor(["cpu", "cpu"], threads=1) as ex:
        ex.start(jobs)
        assert [j.name for j in ex.running()] == ["j0", "j1"]  # j2 waits for a free slot
        outcomes = collect(ex, 3)
        assert ex.running() == [] and ex.wait(0) == []
    assert all(o.ok and o.error is None for o in outcomes.values())
    values = [outcomes[j.name].value for j in jobs]
    assert [v["name"] for v in values] == ["j0", "j1", "j2"]
    assert {v["threads"] for v in values} == {"1"}  # pinned in the child's environment
    assert {v["cuda"] for v in values} == {""}  # a CPU slot hides the GPUs
    assert len({v["pid"] for v in values}) == 3  # a process per job
    # never more than two at once: count the runs in flight at each start
    for v in values:
        assert sum(w["start"] <= v["start"] < w["end"] for w in values) <= 2
    for j in jobs:
        assert json.loads((j.folder / worker.RESULT_FILE).read_text())["name"] == j.name
        assert "j" in (j.folder / worker.LOG_FILE).read_text()


def test_gpu_slot_sets_the_parents_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with make_executor("local", tmp_path, slots=["1"], threads=2) as ex:
        ex.start([SleepJob("g", tmp_path / "g")])
        value = collect(ex, 1)["g"].value
    assert (value["cuda"], value["threads"]) == ("5", "2")  # slot "1" is the parent's cuda:1
    with pytest.raises(ValueError, match="shows 2 GPU"):
        LocalExecutor(["2"])


def test_local_failures_are_one_line_outcomes(tmp_path):
    jobs = [SleepJob("bad", tmp_path / "bad", action="raise"),
            SleepJob("killed", tmp_path / "killed", action="sigkill"),
            SleepJob("good", tmp_path / "good", seconds=0.2),
            SleepJob("list", tmp_path / "list", action="list")]
    with LocalExecutor(["cpu", "cpu"], threads=1) as ex:
        ex.start(jobs)
        outcomes = collect(ex, 4)
    bad, killed, good, listed = (outcomes[j.name] for j in jobs)
    assert good.ok and good.value["name"] == "good"
    assert not bad.ok and bad.value is None
    assert bad.error.startswith("RuntimeError: boom in bad (see ") and "\n" not in bad.error
    assert str(tmp_path / "bad" / "worker.log") in bad.error
    recorded = json.loads((tmp_path / "bad" / worker.ERROR_FILE).read_text())
    assert "Traceback" in recorded["traceback"] and "boom in bad" in recorded["traceback"]
    assert "boom in bad" in (tmp_path / "bad" / worker.LOG_FILE).read_text()
    assert not killed.ok and "signal 9" in killed.error and "SIGKILL" in killed.error
    assert not listed.ok and listed.error.startswith("TypeError: job list returned list")


def test_close_stops_a_running_job_promptly(tmp_path):
    ex = LocalExecutor(["cpu"], threads=1)
    ex.start([SleepJob("long", tmp_path / "long", seconds=60),
              SleepJob("queued", tmp_path / "queued")])
    pid = int(wait_for_file(tmp_path / "long" / "pid"))
    started = time.monotonic()
    ex.close()
    assert time.monotonic() - started < 3
    assert not alive(pid)
    assert ex.running() == [] and not (tmp_path / "queued" / "pid").exists()
    with pytest.raises(RuntimeError, match="closed"):
        ex.start([SleepJob("late", tmp_path / "late")])


def test_killing_the_parent_kills_its_children(tmp_path):
    folder = tmp_path / "orphan"
    script = (
        "from pathlib import Path\n"
        "from kcap.experiments.executors import LocalExecutor\n"
        f"from {SleepJob.__module__} import SleepJob\n"
        "ex = LocalExecutor(['cpu'], threads=1)\n"
        f"ex.start([SleepJob('orphan', Path({str(folder)!r}), seconds=120)])\n"
        "while True:\n"
        "    ex.wait(1.0)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        child = int(wait_for_file(folder / "pid"))
        parent.send_signal(signal.SIGKILL)  # no cleanup code of the parent runs
        parent.wait(10)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the worker outlived its killed parent"
    finally:
        parent.kill()
        if (folder / "pid").exists() and alive(int((folder / "pid").read_text())):
            os.kill(int((folder / "pid").read_text()), signal.SIGKILL)


def test_submitit_local_runs_an_array(tmp_path):
    from kcap.experiments.executors import SubmititExecutor

    jobs = [SleepJob("a", tmp_path / "a"), SleepJob("b", tmp_path / "b"),
            SleepJob("c", tmp_path / "c", action="raise")]
    with make_executor("slurm", tmp_path / "submitit", cluster="local", timeout_min=5,
                       cpus_per_task=1, slurm_partition="ignored-locally") as ex:
        assert isinstance(ex, SubmititExecutor) and ex.cluster == "local"
        ex.start(jobs)
        assert {j.name for j in ex.running()} == {"a", "b", "c"}
        outcomes = collect(ex, 3, limit=45)
        assert set(ex.states()) == {"a", "b", "c"}
        assert all(isinstance(s, str) for s in ex.states().values())
    assert outcomes["a"].ok and outcomes["a"].value["name"] == "a"
    assert outcomes["b"].ok and outcomes["b"].value["threads"] == "1"  # from cpus_per_task
    assert not outcomes["c"].ok
    assert outcomes["c"].error.startswith("RuntimeError: boom in c (see ")
    assert str(tmp_path / "submitit") in outcomes["c"].error  # submitit's log of that task


def test_submitit_debug_runs_in_process(tmp_path):
    from kcap.experiments.submitit_executor import SubmititExecutor

    ex = SubmititExecutor(tmp_path / "submitit", cluster="debug")
    ex.start([SleepJob("ok", tmp_path / "ok"), SleepJob("bad", tmp_path / "bad", action="raise")])
    outcomes = collect(ex, 2)
    assert outcomes["ok"].ok and outcomes["ok"].value["pid"] == os.getpid()
    # no pdb session: the failure is read from the job's folder
    assert outcomes["bad"].error.startswith("RuntimeError: boom in bad")
    ex.close()


def test_bad_inputs_are_refused(tmp_path):
    from kcap.experiments.submitit_executor import SubmititExecutor

    with pytest.raises(ValueError, match="allowed: .*slurm_partition"):
        SubmititExecutor(tmp_path, cluster="local", partition="gpu")
    with pytest.raises(ValueError, match="cluster must be"):
        SubmititExecutor(tmp_path, cluster="aws")
    with pytest.raises(TypeError, match="timeout_min"):
        SubmititExecutor(tmp_path, cluster="local", timeout_min="5")
    with pytest.raises(ValueError, match="at least one slot"):
        LocalExecutor([])
    for slot in ("gpu0", "-1", " 0", ""):
        with pytest.raises(ValueError, match="'cpu' or a GPU index"):
            LocalExecutor([slot])
    with pytest.raises(TypeError, match="must be a str"):
        LocalExecutor([0])
    with pytest.raises(TypeError, match="list of str"):
        LocalExecutor("cpu")
    with pytest.raises(ValueError, match="threads"):
        LocalExecutor(["cpu"], threads=0)
    with pytest.raises(ValueError, match="'local' or 'slurm'"):
        make_executor("k8s", tmp_path)
    with LocalExecutor(["cpu"]) as ex:
        with pytest.raises(ValueError, match="used twice"):
            ex.start([SleepJob("x", tmp_path / "x"), SleepJob("x", tmp_path / "y")])
        with pytest.raises(TypeError, match="folder path and a __call__"):
            ex.start([SleepJob("x", None)])
        with pytest.raises(ValueError, match=">= 0"):
            ex.wait(-1)
        with pytest.raises(TypeError, match="seconds"):
            ex.wait("1")
        assert ex.running() == []  # nothing of the refused lists started


def test_worker_main_records_a_job_that_cannot_load(tmp_path):
    (tmp_path / worker.JOB_FILE).write_bytes(b"not a pickle")
    assert worker.main([str(tmp_path / worker.JOB_FILE)]) == 1
    assert json.loads((tmp_path / worker.ERROR_FILE).read_text())["error"].startswith(
        "UnpicklingError")
