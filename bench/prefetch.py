"""The host side of a training step with its next batch rendered in line, by a thread (the
design kcap had until 2026-12-06) or by a child process (kcap.prefetch now).

On a GPU the host's work in a step is launching kernels: Python and torch's dispatcher, a
few microseconds per op, releasing the GIL inside each op. A loop of small torch ops on
tiny CPU tensors stands in for it here (the op counts of a solo step and a pack step are a
few hundred to a few thousand, bench/results/pack-cpu-*.md), followed by the batch of each
stream: 64 windows of 513 tokens of bioS(10,000), as the paper's batches for small N. The
best a prefetcher can do is the longer of the two (ops alone, rendering alone: both timed
here); rendering in line costs their sum.

Needs no GPU: what it measures is the host. The child processes need cores of their own
to overlap (the GPU machine has 16); on 2 cores the two-stream case shares them.
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from bench.harness import Stages, save, time_wall

WINDOWS, WINDOW = 64, 513


class _ThreadAhead:
    """The replaced design, kept as the baseline: a thread renders ``depth`` batches ahead."""

    def __init__(self, stream, count: int, depth: int = 2):
        self.queue, self.stop = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._run, args=(stream, count), daemon=True)
        self.thread.start()

    def _run(self, stream, count):
        import torch

        while not self.stop.is_set():
            windows = stream.next_windows(count)
            item = (windows, torch.from_numpy(np.asarray(windows.tokens, dtype=np.int64)))
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next_windows(self, count):
        return self.queue.get()[0]

    def close(self):
        self.stop.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)


def run(quick: bool = False) -> None:
    import torch

    from kcap.data.bios import BioS, BioSConfig
    from kcap.data.stream import ExposureStream
    from kcap.prefetch import PrefetchedStream

    torch.set_num_threads(1)  # the ops stand for launches: one core's work, not a GEMM
    data = BioS(BioSConfig(n=10_000))
    scratch = torch.zeros(4)
    steps = 10 if quick else 30
    cases = [(1, 300), (1, 1000), (1, 3000), (2, 1000)]
    cases = cases[1:2] if quick else cases

    def streams(n):
        return [ExposureStream(data, 1000, WINDOW, seed=i) for i in range(n)]

    rows = []
    stages = Stages("prefetch", len(cases))
    for n_streams, n_ops in cases:
        def ops(n_ops=n_ops):
            for _ in range(n_ops):
                scratch.add_(1.0)

        def loop(sources, with_ops=True, with_data=True):
            for _ in range(steps):
                if with_ops:
                    ops()
                if with_data:
                    for s in sources:
                        w = s.next_windows(WINDOWS)
                        if not isinstance(s, PrefetchedStream):  # what tokens_on does in line
                            torch.from_numpy(np.asarray(w.tokens, dtype=np.int64))

        case = f"{n_ops} ops + {n_streams} x {WINDOWS} windows of {WINDOW} per step"
        stages.start(case)
        providers = [("in line", lambda: streams(n_streams)),
                     ("ops alone (bound)", None), ("rendering alone (bound)", lambda: streams(n_streams)),
                     ("thread (before)", lambda: [_ThreadAhead(s, WINDOWS) for s in streams(n_streams)]),
                     ("process (kcap)", lambda: [PrefetchedStream(s, WINDOWS) for s in streams(n_streams)])]
        for provider, make in providers:
            sources = make() if make else []
            try:
                for s in sources:  # the first batch: a prefetcher's start-up is not a step
                    s.next_windows(WINDOWS)
                seconds = time_wall(lambda: loop(sources, provider != "rendering alone (bound)",
                                                 provider != "ops alone (bound)"), repeats=3) / steps
            finally:
                for s in sources:
                    if hasattr(s, "close"):
                        s.close()
            rows.append({"case": case, "provider": provider, "median_s": seconds,
                         "throughput": n_streams * WINDOWS * WINDOW / seconds, "unit": "tokens/s",
                         "ops_per_step": n_ops, "streams": n_streams})
    stages.finish()
    save("prefetch", rows, baseline="in line")
