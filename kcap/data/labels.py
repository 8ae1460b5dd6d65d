"""What each token of the data is: the label stream the capacity metric reads.

``field`` (int16) per token: TEXT for template words, NAME for the first full name of a
biography, SPECIAL for EOS/padding/markers, VALUE + a for the value of attribute a (bioS:
index into the dataset's attribute list; bioD: attribute a). ``chunk`` (int16): the bioD
chunk index inside a value (0 for bioS values, -1 outside values). ``person`` (int64): the
dataset index of the person whose biography the token belongs to (-1 for padding).

Stored (``kcap data --out ... --labels``), the labels take the smallest unsigned dtypes:
``compact`` maps -1 to the dtype's largest value, ``expand`` maps it back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXT, NAME, SPECIAL, PRONOUN, VALUE = 0, 1, 2, 3, 8  # PRONOUN only exists while rendering


def storage_dtype(high: int) -> np.dtype:
    """The smallest unsigned dtype holding [0, high] and, above it, its largest value as
    the code for -1 (255 people fit uint8: ids 0..254, 255 for padding; 256 need uint16)."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if high < np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"high must be < 2**64 - 1, got {high}")


@dataclass
class TokenLabels:
    """Per-token labels, arrays of one shape: ``field`` int16, ``chunk`` int16, ``person``
    int64 (see the module docstring).

    Files written by ``kcap data --out F.npz --labels`` hold the ``compact`` form: field
    uint8; chunk uint8 (C <= 255) or uint16; person uint8, uint16 or uint32 for N up to
    255, up to 65,535 or more; -1 (padding, outside values) stored as the dtype's largest
    value. Read them back with
    ``TokenLabels(z["field"], z["chunk"], z["person"]).expand()``.
    """
    field: np.ndarray   # (n,) int16
    chunk: np.ndarray   # (n,) int16
    person: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.field)

    def __getitem__(self, index) -> "TokenLabels":
        return TokenLabels(self.field[index], self.chunk[index], self.person[index])

    def reshape(self, *shape) -> "TokenLabels":
        return TokenLabels(self.field.reshape(*shape), self.chunk.reshape(*shape),
                           self.person.reshape(*shape))

    @staticmethod
    def concatenate(parts: list["TokenLabels"]) -> "TokenLabels":
        return TokenLabels(np.concatenate([p.field for p in parts]),
                           np.concatenate([p.chunk for p in parts]),
                           np.concatenate([p.person for p in parts]))

    def compact(self, people: int, chunks: int, attributes: int) -> "TokenLabels":
        """These labels in the smallest dtypes for ``people`` persons, ``chunks`` chunks per
        value and ``attributes`` attributes (see the class docstring); ValueError if a
        label lies outside those bounds."""
        out = []
        for name, high in (("field", VALUE + attributes - 1), ("chunk", chunks - 1),
                           ("person", people - 1)):
            values = np.asarray(getattr(self, name))
            if values.size and (values.min() < -1 or values.max() > high):
                raise ValueError(f"{name} labels must lie in [-1, {high:,}], got values in "
                                 f"[{values.min():,}, {values.max():,}]")
            stored = values.astype(storage_dtype(high))
            stored[values < 0] = np.iinfo(stored.dtype).max
            out.append(stored)
        return TokenLabels(*out)

    def expand(self) -> "TokenLabels":
        """The working dtypes (int16, int16, int64) of ``compact`` labels, -1 restored."""
        out = []
        for name, dtype in (("field", np.int16), ("chunk", np.int16), ("person", np.int64)):
            values = np.asarray(getattr(self, name))
            if not np.issubdtype(values.dtype, np.unsignedinteger):
                raise TypeError(f"{name} must hold unsigned integers (compact labels), got "
                                f"{values.dtype}")
            restored = values.astype(dtype)
            restored[values == np.iinfo(values.dtype).max] = -1
            out.append(restored)
        return TokenLabels(*out)

    @staticmethod
    def padding(n: int) -> "TokenLabels":
        return TokenLabels(np.full(n, SPECIAL, np.int16), np.full(n, -1, np.int16),
                           np.full(n, -1, np.int64))


@dataclass(frozen=True)
class Attribute:
    """One attribute of a person: ``cardinality`` equally likely values; ``counted`` says
    whether its bits are part of the knowledge (bioS's working city is a function of the
    employer, so it carries none).

    ``determined_by``: the attribute this one is a function of (work city: employer). Where
    its value comes first in a biography it already reveals part of that attribute, so the
    metric counts its loss in that attribute's term (the chain rule; kcap/capacity.py).

    ``classes``: for a value of one token whose token also carries template choices (the
    gender's pronoun: He / His / him ...), the token ids expressing each value (class c
    holds the ids of value c). The metric scores the value as the choice between classes,
    -ln sum(p(class of the observed token)) / sum(p(any class)), not the token itself.
    """
    name: str
    cardinality: int
    counted: bool = True
    determined_by: str | None = None
    classes: tuple[tuple[int, ...], ...] | None = None
