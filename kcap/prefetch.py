"""Batches rendered ahead of the training step by a background thread.

On a GPU a step must not wait for the host: while step t runs, the windows of step t+1 are
rendered (numpy, which releases the GIL in its heavy loops) into pinned memory, so that the
trainer's copy to the device is non-blocking. The data a run sees is unchanged: the same
batches in the same order; and what a checkpoint records is the position of the batches
*consumed*, not of those rendered ahead, so a resumed run continues where it stood.

On a CPU the trainers keep rendering in line: the thread would only take a core from the
step (``PREFETCH_ON_CPU`` turns it on there, for the tests).
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from kcap.run_setup import stream_exposures

PREFETCH_ON_CPU = False
_DONE = object()


def use_prefetch(device) -> bool:
    return device.type == "cuda" or PREFETCH_ON_CPU


class PrefetchedStream:
    """Wraps a training stream (ExposureStream or MixtureStream) whose batches all have
    ``count`` windows: ``depth`` batches are rendered ahead. ``next_windows(count)`` returns
    the next Windows (its ``tokens`` as the stream gave them) and keeps an int64 torch copy in
    ``last_tensor`` (pinned if ``pin``). ``state_dict()`` and ``exposures_done`` describe the
    batches consumed so far; call ``close()`` when done."""

    def __init__(self, stream, count: int, depth: int = 2, pin: bool = False):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        self.stream, self.count, self.pin = stream, count, pin
        self._state = stream.state_dict()
        self._exposures = stream_exposures(stream)
        self.last_tensor = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True, name="kcap-prefetch")
        self._thread.start()

    def _produce(self) -> None:
        import torch

        try:
            while not self._stop.is_set():
                windows = self.stream.next_windows(self.count)
                tensor = torch.from_numpy(np.asarray(windows.tokens, dtype=np.int64))
                if self.pin:
                    tensor = tensor.pin_memory()
                item = (windows, tensor, self.stream.state_dict(), stream_exposures(self.stream))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if len(windows) == 0:  # a finite stream has ended: nothing more to render
                    return
        except BaseException as err:  # handed to the consumer, raised in the training loop
            self._queue.put((_DONE, err, None, None))

    def next_windows(self, count: int):
        if count != self.count:
            raise ValueError(f"this prefetched stream renders batches of {self.count} windows, "
                             f"asked for {count}")
        windows, tensor, state, exposures = self._queue.get()
        if windows is _DONE:
            raise tensor
        self.last_tensor, self._state, self._exposures = tensor, state, exposures
        return windows

    def state_dict(self) -> dict:
        return self._state

    @property
    def exposures_done(self) -> float:
        return self._exposures

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


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
