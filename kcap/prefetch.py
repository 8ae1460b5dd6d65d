"""Batches rendered ahead of the training step by a child process.

On a GPU a step must not wait for the host: while step t runs, the windows of step t+1 are
rendered, and the trainer's copy to the device is non-blocking (pinned memory). The data
a run sees is unchanged: the same batches in the same order; and what a checkpoint records
is the position of the batches *consumed*, not of those rendered ahead, so a resumed run
continues where it stood.

Why a process and not a thread: rendering holds the GIL between its numpy calls, and the
training loop, which releases it in every torch op it launches, then waits for it again
each time (up to the interpreter's switch interval). Measured on 2 cores with a loop of
small torch ops standing in for kernel launches (bench/results/prefetch-cpu-*.md), a
thread was at best even with rendering in line (0.73-1.05x); a process overlaps the two
(1.04-1.84x). The child is forked (as torch's DataLoader workers are on Linux): it starts
at once with the stream already in memory, touches no CUDA, and leaves if the trainer dies.

On a CPU the trainers keep rendering in line: the child would only take a core from the
step (``PREFETCH_ON_CPU`` turns it on there, for the tests).
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import queue
import signal

import numpy as np

from kcap.run_setup import stream_exposures

PREFETCH_ON_CPU = False
_FAILED = "failed"  # a message's tag: the child failed (its error follows)
_POLL_S = 0.1  # how often a blocked side looks whether the other has gone


def use_prefetch(device) -> bool:
    """Whether the trainers render ahead: on a GPU (or when forced), unless this process is
    a daemonic multiprocessing worker (a Pool's), which may not start children."""
    return (device.type == "cuda" or PREFETCH_ON_CPU) and not multiprocessing.current_process().daemon


def _render(stream, count: int, out, stop, parent: int) -> None:
    """The child: render batches of ``count`` windows into ``out`` with the stream's state
    after each, until told to stop, the stream ends, or the parent is gone; then wait for
    the parent's ``close`` (its last messages may still be in the pipe)."""
    def parent_waits() -> bool:
        return not stop.is_set() and os.getppid() == parent

    # Ctrl-C reaches the whole process group: the trainer handles it and closes this child
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # What the parent owned stays out of this child's garbage collection: a cycle holding a
    # CUDA tensor freed here would call into CUDA from a forked process, and collecting
    # would also copy the parent's pages (copy-on-write) for nothing.
    gc.freeze()

    def put(item) -> bool:
        while parent_waits():
            try:
                out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        while True:
            windows = stream.next_windows(count)
            if not put(("windows", windows, stream.state_dict(), stream_exposures(stream))):
                break
            if len(windows) == 0:  # a finite stream has ended: nothing more to render
                break
    except BaseException as err:  # handed to the trainer, raised in the training loop
        try:  # the queue pickles in a thread of its own, where a failure would be lost
            pickle.dumps(err)
        except Exception:
            err = RuntimeError(f"{type(err).__name__}: {err}")
        put((_FAILED, err, None, None))
    finally:
        while parent_waits():
            stop.wait(_POLL_S)
        out.cancel_join_thread()  # stopped: what is still unsent may be dropped


class PrefetchedStream:
    """Wraps a training stream (ExposureStream or MixtureStream) whose batches all have
    ``count`` windows: a child process renders ``depth`` batches ahead. ``next_windows(count)``
    returns the next Windows (its ``tokens`` as the stream gave them) and keeps an int64
    torch copy in ``last_tensor`` (pinned if ``pin``). ``state_dict()`` and
    ``exposures_done`` describe the batches consumed so far; call ``close()`` when done.
    The stream object given is left where it stood: the child renders from its own copy."""

    def __init__(self, stream, count: int, depth: int = 2, pin: bool = False):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        self.stream, self.count, self.pin = stream, count, pin
        self._state = stream.state_dict()
        self._exposures = stream_exposures(stream)
        self.last_tensor = None
        self._ended = None  # the empty batch that ended a finite stream, given again if asked
        ctx = multiprocessing.get_context("fork")
        self._queue = ctx.Queue(maxsize=depth)
        self._stop = ctx.Event()
        self._process = ctx.Process(target=_render, name="kcap-prefetch", daemon=True,
                                    args=(stream, count, self._queue, self._stop, os.getpid()))
        self._process.start()

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._process.is_alive():  # killed (out of memory, a signal...)
                    try:  # unless its last message arrived just now
                        return self._queue.get(timeout=_POLL_S)
                    except queue.Empty:
                        raise RuntimeError(f"the data prefetch process died (exit code "
                                           f"{self._process.exitcode}) before rendering the "
                                           "next batch") from None

    def next_windows(self, count: int):
        import torch

        if count != self.count:
            raise ValueError(f"this prefetched stream renders batches of {self.count} windows, "
                             f"asked for {count}")
        if self._ended is not None:  # the child has nothing more to send
            return self._ended
        tag, windows, state, exposures = self._get()
        if tag == _FAILED:
            raise windows
        if len(windows) == 0:
            self._ended = windows
        tokens = torch.from_numpy(np.asarray(windows.tokens))
        tensor = torch.empty(tokens.shape, dtype=torch.int64, pin_memory=self.pin)
        tensor.copy_(tokens)  # int32 -> int64, straight into pinned memory when pinning
        self.last_tensor, self._state, self._exposures = tensor, state, exposures
        return windows

    def state_dict(self) -> dict:
        return self._state

    @property
    def exposures_done(self) -> float:
        return self._exposures

    def close(self) -> None:
        self._stop.set()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        self._queue.close()
        self._queue.cancel_join_thread()  # this side never put anything


def upload(t, device):
    """A small host tensor on ``device`` without a host synchronisation: on CUDA through
    pinned memory (a pageable host-to-device copy waits for the GPU's queue)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def tokens_on(stream, windows, device):
    """The batch's tokens (n, window + 1) int64 on ``device``: from the pinned copy, without
    blocking, when ``stream`` prefetches."""
    import torch

    if isinstance(stream, PrefetchedStream):
        tensor = stream.last_tensor  # the copy rendered with ``windows``
    else:
        tensor = torch.from_numpy(np.asarray(windows.tokens, dtype=np.int64))
    return tensor.to(device, non_blocking=True)
