"""Tiny jobs for the executor tests, in a module of their own: a worker process unpickles a
job by importing its class, which it can do from this file (tests/ on PYTHONPATH) but not
from a test module run by pytest. No torch here: a worker should start in a blink."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from kcap.atomic import write_text


@dataclass
class SleepJob:
    """Sleeps ``seconds``, then returns what it saw; ``action`` "raise" or "sigkill" fails."""
    name: str
    folder: Path
    seconds: float = 0.0
    action: str = "ok"

    def __call__(self) -> dict:
        start = time.time()
        write_text(Path(self.folder) / "pid", str(os.getpid()))
        if self.action == "raise":
            raise RuntimeError(f"boom in {self.name}")
        if self.action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "list":
            return [self.name]  # not a dict: the worker refuses it
        time.sleep(self.seconds)
        return {"name": self.name, "start": start, "end": time.time(), "pid": os.getpid(),
                "threads": os.environ.get("OMP_NUM_THREADS"),
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
