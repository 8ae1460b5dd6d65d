"""Data generation speed: the vectorized exposure stream against a plain per-biography
Python renderer (string templates + tokenizer.encode + packing), in the same run.

Target (foundation issue): >= 10M tokens/s for online bioS on a 2-core CPU.
"""
from __future__ import annotations

import numpy as np

from bench.harness import Stages, save, time_wall
from kcap.data.biod import BioD, BioDConfig
from kcap.data.bios import BioS, BioSConfig
from kcap.data.stream import ExposureStream

WINDOW = 512


def python_baseline(dataset, n_bios: int) -> int:
    """Render ``n_bios`` biographies one by one as text, tokenize, pack; return tokens."""
    tok, buffer, windows = dataset.tokenizer, [], []
    for i in range(n_bios):
        person, exposure = i % dataset.n_people, i // dataset.n_people
        buffer.extend(tok.encode(dataset.text(person, exposure)))
        while len(buffer) >= WINDOW:
            windows.append(np.array(buffer[:WINDOW], dtype=np.int32))
            del buffer[:WINDOW]
    return len(windows) * WINDOW


def fast(dataset, n_windows: int, labels: bool) -> int:
    stream = ExposureStream(dataset, 1000, window=WINDOW, labels=labels)
    done = 0
    while done < n_windows:
        done += len(stream.next_windows(min(1024, n_windows - done)))
    return done * WINDOW


def run(quick: bool = False) -> None:
    cases = {"bioS(1M) online": BioS(BioSConfig(n=1_000_000)),
             "bioD(100K,K=8,C=2,D=1000,L=4,T=100)": BioD(BioDConfig(n=100_000, k=8, c=2, d=1000,
                                                                     l=4, t=100))}
    n_bios, n_windows = (300, 2_000) if quick else (2_000, 40_000)
    rows = []
    stages = Stages("data", 3 * len(cases))
    for case, ds in cases.items():
        for provider, fn in (("python per-biography", lambda: python_baseline(ds, n_bios)),
                             ("kcap stream", lambda: fast(ds, n_windows, False)),
                             ("kcap stream + labels", lambda: fast(ds, n_windows, True))):
            stages.start(f"{case}: {provider}, 1 + 1 warm-up + 3 timed runs")
            tokens = fn()
            seconds = time_wall(fn, repeats=3)
            rows.append({"case": case, "provider": provider, "tokens": tokens,
                         "median_s": seconds, "throughput": tokens / seconds, "unit": "tokens/s"})
    stages.finish()
    save("data", rows, baseline="python per-biography")
