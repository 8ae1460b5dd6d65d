"""Rendering as a ragged gather over a table of pre-tokenized pieces.

Every fixed piece of text the renderers can emit (a template fragment, a name, a value, a
bioD chunk) is tokenized once into an *entry* of a flat table, with a label per token. A
biography is then a row of entry ids, and rendering a batch of biographies is one gather
over the table: no strings and no Python loop per biography. This is what lets the data
stream outrun a GPU.
"""
from __future__ import annotations

import numpy as np

from kcap.data.labels import NAME, TEXT


class TokenTable:
    """Append-only table of token-id sequences with per-token ``field`` labels.

    Entry 0 is the empty sequence, used to pad rows of entry ids.
    """

    def __init__(self):
        self._tokens: list[list[int]] = [[]]
        self._fields: list[list[int]] = [[]]
        self._index: dict[tuple, int] = {((), ()): 0}
        self.tokens = self.fields = self.offsets = self.lengths = None

    def add(self, ids, fields) -> int:
        """Entry id of ``ids`` labelled ``fields`` (identical entries are shared)."""
        ids, fields = tuple(int(i) for i in ids), tuple(int(f) for f in fields)
        if len(ids) != len(fields):
            raise ValueError("ids and fields differ in length")
        key = (ids, fields)
        if key not in self._index:
            self._index[key] = len(self._tokens)
            self._tokens.append(list(ids))
            self._fields.append(list(fields))
        return self._index[key]

    def add_block(self, rows, field: int) -> int:
        """Add id sequences (a list of lists or a (rows, width) array) as consecutive
        entries labelled ``field``; return the first entry id.

        Not deduplicated, so entry ``first + i`` is row i (used for pools and bioD chunks).
        """
        first = len(self._tokens)
        for row in (rows.tolist() if isinstance(rows, np.ndarray) else rows):
            self._tokens.append(row)
            self._fields.append([field] * len(row))
        return first

    def freeze(self) -> "TokenTable":
        """Build the flat arrays; call once after the last add."""
        self.lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.tokens = np.array([i for t in self._tokens for i in t], dtype=np.int32)
        self.fields = np.array([f for t in self._fields for f in t], dtype=np.int16)
        return self

    def entry_tokens(self, entries) -> np.ndarray:
        """Sorted distinct token ids appearing in the given entries."""
        entries = np.unique(np.asarray(entries, dtype=np.int64))
        index, _, _ = self.gather(entries[None, :])
        return np.unique(self.tokens[index]).astype(np.int64)

    def gather(self, entries: np.ndarray):
        """Render rows of entry ids.

        entries: (B, S) int array. Returns (index, row_lengths, slot_lengths): ``index`` is
        the flat (sum of lengths,) int64 position of every output token in the table (so
        ``self.tokens[index]`` are the ids and ``self.fields[index]`` the labels),
        ``row_lengths`` (B,) the token count of each row, ``slot_lengths`` (B*S,) the
        token count of every entry slot (to repeat per-slot data onto tokens).
        """
        flat = entries.reshape(-1)
        slot_lengths = self.lengths[flat]
        index = ragged_arange(self.offsets[flat], slot_lengths)
        return index, slot_lengths.reshape(entries.shape).sum(axis=1), slot_lengths


def ragged_arange(starts, lengths) -> np.ndarray:
    """The aranges [s, s + l) of each (start, length), concatenated: int64 (sum(lengths),).
    One gather index for many ragged slices of a flat array, without a Python loop."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


def add_name_rows(table: TokenTable, tokenizer, pools) -> list[int]:
    """Add the name-part rows both renderers use; return their six first entry ids.

    [first bare, middle, last] are labelled NAME (the full name opening a biography);
    [first, middle, last], spaced, are labelled TEXT (a name repeated later, a copy).
    """
    pid = tokenizer.piece_id
    bases = [table.add_block([[pid(n)] for n in pools.first_names], NAME)]
    for pool in (pools.middle_names, pools.last_names):
        bases.append(table.add_block([[pid(" " + n)] for n in pool], NAME))
    for pool in (pools.first_names, pools.middle_names, pools.last_names):
        bases.append(table.add_block([[pid(" " + n)] for n in pool], TEXT))
    return bases


class Rendered:
    """A batch of rendered biographies: ``tokens`` (n,) int32 concatenated, ``lengths``
    (B,) int64 tokens per biography, ``labels`` a TokenLabels of length n or None."""

    __slots__ = ("tokens", "lengths", "labels")

    def __init__(self, tokens, lengths, labels=None):
        self.tokens, self.lengths, self.labels = tokens, lengths, labels
