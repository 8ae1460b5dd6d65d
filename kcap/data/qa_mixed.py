"""Pretraining data with QA pairs mixed in for some people (Part 3.1's mixed training).

``QAMixed(dataset, fraction, seed)`` is a data set that renders, for each biography of a
person in ``mixed_people(n, seed, fraction)``, the biography followed by that person's QA
block as a document of its own: every attribute's "question Answer: value." in attribute
order, separated by spaces, then EOS. Other people render as before. Each exposure of a
mixed person therefore also shows its QA pairs once.

The capacity metric still reads the plain data set's biographies: the QA block is training
text only (labelled TEXT), so bits and R mean the same with or without mixing. The mixed
people lie in the fine-tuning half of ``kcap.data.qa.qa_halves``, so the half that
``kcap qa`` tests on never had a QA pair in pretraining.
"""
from __future__ import annotations

import numpy as np

from kcap.data.labels import TEXT, TokenLabels
from kcap.data.memory_budget import check_memory
from kcap.data.qa import QA_KINDS, encode_qa, mixed_people, qa_pairs
from kcap.data.templates import ATTRIBUTES
from kcap.data.token_table import Rendered, ragged_arange
from kcap.data.tokenizer import EOS_ID

_BLOCK_PEOPLE = 4096  # QA blocks are built for this many people at a time


def trained_data(dataset, fraction: float, seed: int):
    """What training renders for a data set and ``data.qa_fraction``: the data set itself,
    or a QAMixed of it when some people's QA pairs are mixed in."""
    return QAMixed(dataset, fraction, seed) if fraction else dataset


class QAMixed:
    """A bioS/bioR data set whose mixed people's biographies are followed by their QA block.

    dataset: a BioS or BioR; fraction: share of people mixed, in [0, 0.5]; seed: the data
    seed (it picks the people, with kcap.data.qa.qa_halves' permutation).
    """

    def __init__(self, dataset, fraction: float, seed: int):
        if getattr(dataset, "kind", None) not in QA_KINDS:
            raise TypeError("QAMixed needs a bioS or bioR data set, got "
                            f"{getattr(dataset, 'kind', type(dataset).__name__)}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"fraction must be a number, got {fraction!r}")
        self.base, self.fraction = dataset, float(fraction)
        self.kind, self.n_people, self.tokenizer = dataset.kind, dataset.n_people, dataset.tokenizer
        self.attributes, self.n_names = dataset.attributes, dataset.n_names
        self.config = (dataset.config, ("qa_fraction", self.fraction))  # the stream's fingerprint
        self.people = mixed_people(dataset.n_people, seed, self.fraction)
        self._tokens: np.ndarray | None = None  # QA blocks of self.people, concatenated
        self._offsets: np.ndarray | None = None

    # --- the QA blocks ----------------------------------------------------------------------
    def _blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32, offsets (len(people) + 1,) int64) of every mixed person's block,
        built once (~96 tokens per person)."""
        if self._tokens is None:
            check_memory(len(self.people) * 100 * 4, f"QA blocks of {len(self.people):,} people",
                         "data.qa_fraction or data.n")
            parts, lengths = [], []
            for lo in range(0, len(self.people), _BLOCK_PEOPLE):
                pairs = qa_pairs(self.base, self.people[lo:lo + _BLOCK_PEOPLE])
                per = len(ATTRIBUTES)  # person-major: one pair per attribute
                for i in range(0, len(pairs), per):
                    block = []
                    for k, pair in enumerate(pairs[i:i + per]):
                        ids, _ = encode_qa(self.tokenizer, pair)
                        block += (self.tokenizer.encode(" ") if k else []) + ids
                    block.append(EOS_ID)
                    parts.append(np.asarray(block, np.int32))
                    lengths.append(len(block))
            self._tokens = np.concatenate(parts) if parts else np.empty(0, np.int32)
            self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return self._tokens, self._offsets

    def _block_index(self, persons: np.ndarray) -> np.ndarray:
        """(B,) index into self.people of each person, -1 for people not mixed."""
        if not len(self.people):
            return np.full(len(persons), -1, np.int64)
        at = np.minimum(np.searchsorted(self.people, persons), len(self.people) - 1)
        return np.where(self.people[at] == persons, at, -1)

    def block_lengths(self, persons) -> np.ndarray:
        """(B,) tokens of each person's QA block (0 for people not mixed)."""
        persons = np.asarray(persons, np.int64).reshape(-1)
        at = self._block_index(persons)
        if not (at >= 0).any():
            return np.zeros(len(persons), np.int64)
        _, offsets = self._blocks()
        return np.where(at >= 0, offsets[at + 1] - offsets[np.maximum(at, 0)], 0)

    # --- the data set interface (kcap.data.stream, kcap.cli) ---------------------------------
    def render(self, persons, exposures, labels: bool = False) -> Rendered:
        """As the base data set's ``render``, each mixed person's biography followed by its
        QA block: tokens (n,) int32, lengths (B,), labels (the block's tokens TEXT)."""
        r = self.base.render(persons, exposures, labels=labels)
        persons = np.broadcast_to(np.asarray(persons, np.int64), r.lengths.shape)
        extra = self.block_lengths(persons)
        if not extra.any():
            return r
        tokens, offsets = self._blocks()
        at = self._block_index(persons)
        out_len = r.lengths + extra
        out_end = np.cumsum(out_len)
        out = np.empty(int(out_end[-1]), np.int32)
        bio_pos = ragged_arange(out_end - out_len, r.lengths)
        out[bio_pos] = r.tokens
        mixed = at >= 0
        block_dst = ragged_arange((out_end - extra)[mixed], extra[mixed])
        block_src = ragged_arange(offsets[at[mixed]], extra[mixed])
        out[block_dst] = tokens[block_src]
        if not labels:
            return Rendered(out, out_len)
        lab = TokenLabels(np.full(len(out), TEXT, np.int16), np.full(len(out), -1, np.int16),
                          np.repeat(persons, out_len))
        lab.field[bio_pos], lab.chunk[bio_pos] = r.labels.field, r.labels.chunk
        return Rendered(out, out_len, lab)

    def lengths(self, persons, exposures) -> np.ndarray:
        """(B,) tokens of each rendering, QA block included."""
        return self.base.lengths(persons, exposures) + self.block_lengths(
            np.broadcast_to(np.asarray(persons, np.int64), np.shape(persons)))

    def max_length(self) -> int:
        """An upper bound on one rendering: the longest biography plus the longest block."""
        longest_block = 0
        if len(self.people):
            _, offsets = self._blocks()
            longest_block = int(np.diff(offsets).max())
        return self.base.max_length() + longest_block

    def used_token_ids(self) -> np.ndarray:
        """Sorted ids of the biographies and of the QA blocks."""
        tokens, _ = self._blocks() if len(self.people) else (np.empty(0, np.int32), None)
        return np.union1d(self.base.used_token_ids(), tokens.astype(np.int64))

    def text(self, person: int, exposure: int) -> str:
        r = self.render(np.array([person]), np.array([exposure]))
        return self.tokenizer.decode(r.tokens)

