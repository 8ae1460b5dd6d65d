"""Exposure streams: biographies packed into fixed windows, generated on the fly.

The bio sequence of a stream is epochs of the people: position p is person
``permute(N)[p mod N]`` of epoch ``p // N`` (a fresh order per epoch) at exposure
``p // N``, so every person gets its e-th exposure in epoch e. Biographies (each ending in
EOS) are concatenated and cut into windows of ``window`` tokens, with no per-document mask:
a biography may straddle two windows, as in the paper.

Data parallelism: rank r of W takes bio positions r, r + W, r + 2W, ... (W = 1 is the plain
stream). Resuming: a stream's whole position is (cursor, offset), the next token being
token ``offset`` of the rank's bio ``cursor``; ``state_dict`` saves it with a fingerprint of
the stream's configuration, ``load_state_dict`` restores it (refusing a different
configuration), and ``seek`` moves to any window index by summing biography lengths.

``MixtureStream`` interleaves windows of a useful and a junk stream at an exact token ratio:
every block of u + j windows holds u useful ones at positions drawn by a keyed hash.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kcap.data import counter_rng as rng
from kcap.data.arguments import check_int
from kcap.data.labels import TokenLabels
from kcap.data.memory_budget import RENDER_BYTES_PER_TOKEN, check_memory
from kcap.data.tokenizer import PAD_ID

_MIN_RENDER = 256  # biographies rendered per refill, at least
_MAX_POSITION = (1 << 62) - 1  # bio positions (rank + W * local) stay far inside int64


@dataclass
class Windows:
    """``tokens`` (n, window) int32; ``labels`` a TokenLabels of shape (n, window) or None;
    ``useful`` (n,) bool for mixtures (which windows are useful data), else None.
    Padding (only after the last biography of a finite stream) is PAD_ID, labelled SPECIAL.
    In a mixture, ``labels.person`` indexes the useful or the junk data set, as ``useful``
    says."""
    tokens: np.ndarray
    labels: TokenLabels | None = None
    useful: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)


class ExposureStream:
    """Windows of ``dataset`` biographies for ``exposures`` exposures per person.

    dataset: a BioS or BioD. exposures: int >= 1, or None for an endless stream (junk).
    seed: int in [0, 2**63 - 1]. A window that would not fit in memory is refused here.
    """

    def __init__(self, dataset, exposures: int | None, window: int = 512, seed: int = 0,
                 rank: int = 0, world_size: int = 1, labels: bool = False):
        check_int("window", window, 2)
        check_int("seed", seed, 0, rng.MAX_SEED)
        check_int("world_size", world_size, 1)
        check_int("rank", rank, 0, world_size - 1)
        if not all(hasattr(dataset, a) for a in ("n_people", "max_length", "render", "lengths")):
            raise TypeError(f"dataset must be a BioS or BioD, got {type(dataset).__name__}")
        if exposures is not None:  # bio positions are int64
            check_int("exposures", exposures, 1, _MAX_POSITION // dataset.n_people)
        longest = dataset.max_length()
        if longest > window:
            raise ValueError(f"window ({window}) is shorter than a biography of this data set "
                             f"({longest} tokens); use window >= {longest}")
        self._longest = longest
        self._check_read_memory(1, window, "window")
        self.dataset, self.exposures, self.window = dataset, exposures, window
        self.rank, self.world_size, self.with_labels = rank, world_size, labels
        self._key = rng.stream_key(seed, "stream/order")
        n = dataset.n_people
        total = None if exposures is None else n * exposures
        # Bio positions of this rank: rank, rank + W, ... below total.
        self.total_bios = None if total is None else max(0, (total - rank + world_size - 1)
                                                         // world_size)
        self.fingerprint = dict(kind=dataset.kind, data=repr(dataset.config), exposures=exposures,
                                window=window, seed=seed, rank=rank, world_size=world_size)
        self.cursor, self.offset = 0, 0
        self._clear_buffer()

    # --- positions ------------------------------------------------------------------------
    def bios(self, local) -> tuple[np.ndarray, np.ndarray]:
        """(persons, exposures) of this rank's biographies at local indices ``local``."""
        pos = self.rank + self.world_size * np.asarray(local, dtype=np.int64)
        epoch, i = np.divmod(pos, self.dataset.n_people)
        return rng.permute(self._key, self.dataset.n_people, i, epoch), epoch

    @property
    def exposures_done(self) -> float:
        """Exposures per person consumed so far by this rank (fractional)."""
        return (self.rank + self.world_size * self.cursor) / self.dataset.n_people

    @property
    def exhausted(self) -> bool:
        return self.total_bios is not None and self.cursor >= self.total_bios

    # --- reading ----------------------------------------------------------------------------
    def _check_read_memory(self, count: int, window: int, lower: str):
        """Refuse a read whose rendering would not fit: ``count`` windows, or at least a
        refill of _MIN_RENDER biographies, at RENDER_BYTES_PER_TOKEN."""
        tokens = max(count * window * 11 // 10 + self._longest, _MIN_RENDER * self._longest)
        check_memory(tokens * RENDER_BYTES_PER_TOKEN,
                     f"reading {count:,} window(s) of {window:,} tokens", lower)

    def _clear_buffer(self):
        self._tokens = np.empty(0, np.int32)
        self._labels = TokenLabels.padding(0) if self.with_labels else None
        self._lengths = np.empty(0, np.int64)  # full lengths of the buffered bios
        self._end = self.cursor  # local index after the last buffered bio
        self._skip = self.offset  # tokens of the first rendered bio to drop

    def _refill(self, need: int):
        while len(self._tokens) < need and (self.total_bios is None or self._end < self.total_bios):
            mean = 60 if not len(self._lengths) else max(1, int(self._lengths.mean()))
            count = max(_MIN_RENDER, int((need - len(self._tokens)) / mean * 1.1) + 1)
            if self.total_bios is not None:
                count = min(count, self.total_bios - self._end)
            persons, exposures = self.bios(np.arange(self._end, self._end + count))
            r = self.dataset.render(persons, exposures, labels=self.with_labels)
            skip, self._skip = self._skip, 0
            self._tokens = np.concatenate([self._tokens, r.tokens[skip:]])
            if self.with_labels:
                self._labels = TokenLabels.concatenate([self._labels, r.labels[skip:]])
            self._lengths = np.concatenate([self._lengths, r.lengths])
            self._end += count

    def next_windows(self, count: int) -> Windows:
        """The next ``count`` windows (fewer only at the end of a finite stream; the last
        one is then padded). Returns an empty Windows once the stream is exhausted."""
        check_int("count", count, 1)
        self._check_read_memory(count, self.window, "count (windows per read) or the window")
        need = count * self.window
        self._refill(need)
        take = min(need, len(self._tokens))
        tokens, self._tokens = self._tokens[:take], self._tokens[take:]
        labels = None
        if self.with_labels:
            labels, self._labels = self._labels[:take], self._labels[take:]
        # Advance (cursor, offset) past `take` tokens.
        done = np.cumsum(self._lengths)
        consumed = self.offset + take
        whole = int(np.searchsorted(done, consumed, side="right"))
        self.offset = consumed - (int(done[whole - 1]) if whole else 0)
        self.cursor += whole
        self._lengths = self._lengths[whole:]
        pad = -take % self.window
        if pad:
            tokens = np.concatenate([tokens, np.full(pad, PAD_ID, np.int32)])
            if labels is not None:
                labels = TokenLabels.concatenate([labels, TokenLabels.padding(pad)])
        n = len(tokens) // self.window
        return Windows(tokens.reshape(n, self.window),
                       None if labels is None else labels.reshape(n, self.window))

    # --- resuming ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cursor": int(self.cursor), "offset": int(self.offset),
                "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, state: dict):
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError("stream state belongs to a different stream configuration: "
                             f"saved {state.get('fingerprint')}, this one {self.fingerprint}")
        self.cursor, self.offset = int(state["cursor"]), int(state["offset"])
        self._clear_buffer()

    def seek(self, window_index: int, chunk: int = 1 << 16):
        """Move to the start of window ``window_index`` (counted from the stream's start)
        without rendering: biography lengths are summed chunk by chunk."""
        target = check_int("window_index", window_index, 0) * self.window
        cursor, before = 0, 0
        while True:
            stop = cursor + chunk if self.total_bios is None else min(cursor + chunk,
                                                                       self.total_bios)
            if stop <= cursor:
                break
            lengths = self.dataset.lengths(*self.bios(np.arange(cursor, stop)))
            ends = before + np.cumsum(lengths)
            if ends[-1] > target:
                whole = int(np.searchsorted(ends, target, side="right"))
                self.cursor = cursor + whole
                self.offset = target - (int(ends[whole - 1]) if whole else before)
                self._clear_buffer()
                return
            cursor, before = stop, int(ends[-1])
        self.cursor, self.offset = cursor, 0  # past the end: exhausted
        self._clear_buffer()


class MixtureStream:
    """Useful and junk windows at an exact ratio ``useful:junk`` (default 1:7).

    Ends when the useful stream ends (the junk stream should be endless, exposures=None).
    """

    def __init__(self, useful: ExposureStream, junk: ExposureStream, ratio=(1, 7), seed: int = 0):
        if not (isinstance(useful, ExposureStream) and isinstance(junk, ExposureStream)):
            raise TypeError("useful and junk must be ExposureStreams, got "
                            f"{type(useful).__name__} and {type(junk).__name__}")
        if useful.window != junk.window or useful.with_labels != junk.with_labels:
            raise ValueError("useful and junk streams need the same window and labels setting")
        if len(ratio) != 2:
            raise ValueError(f"ratio must be (useful, junk), got {ratio!r}")
        self.u = check_int("ratio[0] (useful)", ratio[0], 1)
        self.j = check_int("ratio[1] (junk)", ratio[1], 0)
        check_int("seed", seed, 0, rng.MAX_SEED)
        self.useful, self.junk, self.window = useful, junk, useful.window
        self._key = rng.stream_key(seed, "stream/mixture")
        self.window_index = 0
        self.fingerprint = dict(ratio=(self.u, self.j), seed=seed)

    def is_useful(self, window_indices) -> np.ndarray:
        """Whether each global window index is a useful window (bool array)."""
        block, pos = np.divmod(np.asarray(window_indices, np.int64), self.u + self.j)
        # The rank of each position inside its block's random order decides.
        order = rng.random_order(self._key, block, width=self.u + self.j)
        ranks = np.argsort(order, axis=1)
        return np.take_along_axis(ranks, pos[:, None], axis=1)[:, 0] < self.u

    def _take(self, stream: ExposureStream, count: int) -> Windows:
        if count:
            return stream.next_windows(count)
        return Windows(np.empty((0, self.window), np.int32),
                       TokenLabels.padding(0).reshape(0, self.window) if stream.with_labels else None)

    def next_windows(self, count: int) -> Windows:
        """The next ``count`` windows; fewer (or none) once the useful stream has ended.

        The mixture ends right after its last useful window, whatever the read sizes.
        """
        check_int("count", count, 1)
        if self.useful.exhausted:
            return self._take(self.useful, 0)
        useful_mask = self.is_useful(self.window_index + np.arange(count))
        good = self._take(self.useful, int(useful_mask.sum()))
        if self.useful.exhausted:  # drop what follows the last useful window
            positions = np.flatnonzero(useful_mask)[:len(good)]
            useful_mask = useful_mask[:positions[-1] + 1 if len(positions) else 0]
        bad = self._take(self.junk, int((~useful_mask).sum()))
        tokens = np.empty((len(useful_mask), self.window), np.int32)
        tokens[useful_mask], tokens[~useful_mask] = good.tokens, bad.tokens
        labels = None
        if self.useful.with_labels:
            labels = TokenLabels.padding(tokens.size).reshape(*tokens.shape)
            for name in ("field", "chunk", "person"):
                getattr(labels, name)[useful_mask] = getattr(good.labels, name)
                getattr(labels, name)[~useful_mask] = getattr(bad.labels, name)
        self.window_index += len(useful_mask)
        return Windows(tokens, labels, useful_mask)

    def state_dict(self) -> dict:
        return {"window_index": self.window_index, "useful": self.useful.state_dict(),
                "junk": self.junk.state_dict(), "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, state: dict):
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"mixture state belongs to a different mixture: {state.get('fingerprint')}")
        self.useful.load_state_dict(state["useful"])
        self.junk.load_state_dict(state["junk"])
        self.window_index = int(state["window_index"])
