"""One writer per run folder: an exclusive lock held while a command writes into a folder.

Two ``kcap train`` on the same ``--out`` used to both succeed, leaving one run's config
beside the other's checkpoints. Every command that writes into a run folder (train and
resume, quantize into its output folder) now holds ``<folder>/.kcap.lock`` for as long as it
writes; a second writer gets a one-line error naming the holder.

The lock is ``flock`` on that file, so the kernel releases it when its holder dies: a lock
left by a killed process is stale by construction and the next writer takes it over, saying
whose it was (a clean release empties the file, so a non-empty file means its holder died). The file is never deleted, because
deleting a lock file races with a process that has just opened it. The holder's pid, host,
command and start time are written into the file for the error message.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".kcap.lock"


class RunFolderBusy(RuntimeError):
    """Another process is writing into this folder."""


def is_run_folder(folder) -> bool:
    """Whether ``folder`` is a training run's folder (what kcap train writes)."""
    folder = Path(folder)
    return (folder / "checkpoints").is_dir() or (
        (folder / "config.json").is_file() and (folder / "log.jsonl").is_file())


def enclosing_run(path) -> Path | None:
    """The run folder that ``path`` is (or lies inside), or None."""
    path = Path(path)
    return next((f for f in [path, *path.resolve().parents] if is_run_folder(f)), None)


def holder(folder) -> dict | None:
    """What the lock file of ``folder`` says about its (last) holder, or None."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def run_lock(folder, purpose: str):
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    Raises RunFolderBusy when another process holds it (another process, or another open
    of the same folder in this process)."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(folder) or {}
            since = who.get("since")
            raise RunFolderBusy(
                f"{folder} is in use by another kcap process ({who.get('purpose', '?')}, pid "
                f"{who.get('pid', '?')} on {who.get('host', '?')}"
                + (f", since {since}" if since else "")
                + "); wait for it to finish, or choose another folder") from None
        stale = holder(folder)
        if stale:  # content is cleared on release: this holder died while writing
            from kcap.console import note
            note(f"{folder}: taking over the lock of a {stale.get('purpose', 'kcap')} process that "
                 f"stopped without releasing it (pid {stale.get('pid', '?')} on "
                 f"{stale.get('host', '?')}, since {stale.get('since', '?')})")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)  # a clean release leaves an empty file
    finally:
        os.close(fd)  # closing the descriptor releases the flock
