"""What each token of the data is: the label stream the capacity metric reads.

``field`` (int16) per token: TEXT for template words, NAME for the first full name of a
biography, SPECIAL for EOS/padding/markers, VALUE + a for the value of attribute a (bioS:
index into the dataset's attribute list; bioD: attribute a). ``chunk`` (int16): the bioD
chunk index inside a value (0 for bioS values, -1 outside values). ``person`` (int64): the
dataset index of the person whose biography the token belongs to (-1 for padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXT, NAME, SPECIAL, PRONOUN, VALUE = 0, 1, 2, 3, 8  # PRONOUN only exists while rendering


@dataclass
class TokenLabels:
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

    @staticmethod
    def padding(n: int) -> "TokenLabels":
        return TokenLabels(np.full(n, SPECIAL, np.int16), np.full(n, -1, np.int16),
                           np.full(n, -1, np.int64))


@dataclass(frozen=True)
class Attribute:
    """One attribute of a person: ``cardinality`` equally likely values; ``counted`` says
    whether its bits are part of the knowledge (bioS's working city is a function of the
    employer, so it carries none)."""
    name: str
    cardinality: int
    counted: bool = True
