"""A closed, offline, reversible word-level tokenizer.

Why not GPT2's BPE: it needs a download, and the metric needs to know exactly which
embedding rows the data uses. Our vocabulary is built deterministically from the pools
and templates, so every word of the data is one token and the used rows are known.

Pieces (regex ``PIECE_RE``): a word ``' ?[A-Za-z]+'``, a number ``' ?[0-9]+'``, one
punctuation mark with an optional leading space, a bioD symbol ``<123>``, or a lone
whitespace character. A space always starts a new piece, so the token ids of a sentence are
the concatenation of the ids of its parts whenever the parts are split before a space or
at punctuation; the fast renderer depends on that. Pieces missing from the vocabulary fall
back to UTF-8 byte tokens, so ``decode(encode(text)) == text`` for any text.

Ids: 0 ``<|endoftext|>`` (EOS), 1 ``<|pad|>``, 2 ``<|useful|>`` (the junk experiments'
marker), then 256 byte tokens, then the words in sorted order, then bioD symbols.
"""
from __future__ import annotations

import functools
import re

import numpy as np

SPECIALS = ("<|endoftext|>", "<|pad|>", "<|useful|>")
EOS_ID, PAD_ID, USEFUL_ID = 0, 1, 2
N_BYTES = 256
PIECE_RE = re.compile(r"<[0-9]+>|\s(?=<[0-9]+>)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]|\s")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


def pieces(text: str) -> list[str]:
    """Split text (without special tokens) into pieces; ''.join(pieces(t)) == t."""
    return PIECE_RE.findall(text)


class Tokenizer:
    """Word-level tokenizer over a fixed list of pieces plus ``n_symbols`` bioD symbols."""

    def __init__(self, words, n_symbols: int = 0):
        words = sorted(set(words))
        for w in words:
            if pieces(w) != [w]:
                raise ValueError(f"vocabulary entry {w!r} is not a single piece")
        if n_symbols < 0:
            raise ValueError(f"n_symbols must be >= 0, got {n_symbols}")
        self.words = tuple(words)
        self.n_symbols = int(n_symbols)
        self.word_offset = len(SPECIALS) + N_BYTES
        self.symbol_offset = self.word_offset + len(self.words)
        self.vocab_size = self.symbol_offset + self.n_symbols
        self._ids = {w: self.word_offset + i for i, w in enumerate(self.words)}
        self._bytes = ([s.encode() for s in SPECIALS] + [bytes([b]) for b in range(N_BYTES)]
                       + [w.encode() for w in self.words]
                       + [f"<{i}>".encode() for i in range(self.n_symbols)])

    eos_id, pad_id, useful_id = EOS_ID, PAD_ID, USEFUL_ID

    def with_symbols(self, n_symbols: int) -> "Tokenizer":
        """The same words plus bioD symbols ``<0>`` .. ``<n_symbols-1>``, one token each."""
        return Tokenizer(self.words, n_symbols)

    def symbol_ids(self, symbols) -> np.ndarray:
        return np.asarray(symbols, dtype=np.int64) + self.symbol_offset

    def piece_id(self, piece: str) -> int:
        """Id of a piece that must be in the vocabulary (KeyError naming it otherwise)."""
        digits = piece[1:-1]
        if piece.startswith("<") and piece.endswith(">") and digits.isascii() and digits.isdigit():
            i = int(digits)
            if i < self.n_symbols and str(i) == digits:  # only the canonical "<5>", not "<05>"
                return self.symbol_offset + i
        try:
            return self._ids[piece]
        except KeyError:
            raise KeyError(f"piece {piece!r} is not in the vocabulary") from None

    def encode_known(self, text: str) -> list[int]:
        """Encode text made only of vocabulary pieces (the renderer's tables use this)."""
        return [self.piece_id(p) for p in pieces(text)]

    def encode(self, text: str) -> list[int]:
        """Token ids of any text; unknown pieces become UTF-8 byte tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        for part in _SPECIAL_RE.split(text):
            if part in SPECIALS:
                ids.append(SPECIALS.index(part))
                continue
            for p in pieces(part):
                try:
                    ids.append(self.piece_id(p))
                except KeyError:
                    ids.extend(len(SPECIALS) + b for b in p.encode())
        return ids

    def decode(self, ids) -> str:
        """Text of token ids (int sequence or numpy array)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside [0, {self.vocab_size})")
        table = self._bytes
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self._bytes[token_id].decode("utf-8", errors="replace")


def _corpus_pieces() -> set[str]:
    from kcap.data.pools import FIRST_YEAR, MONTHS, YEARS, load_pools
    from kcap.data.templates import PLACEHOLDER_RE, load_questions, load_templates

    pools = load_pools()
    texts = list(pools.first_names)  # bare: a biography starts with its first name
    for pool in (pools.first_names, pools.middle_names, pools.last_names, pools.birth_cities,
                 pools.universities, pools.majors, pools.employers, pools.employer_cities,
                 MONTHS, [str(n) for n in range(100)],
                 [str(FIRST_YEAR + y) for y in range(YEARS)]):
        texts += [" " + v for v in pool]
    texts += [str(n) for n in range(100)]
    texts += [p + w for p in ("", " ") for w in ("He", "She", "His", "Her", "he", "she", "his",
                                                 "her", "him")] + ["'s"]
    literal = list(load_questions().values()) + [t for ts in load_templates().values() for t in ts]
    for t in literal:
        texts += PLACEHOLDER_RE.sub("\0", t.replace("{name}", "{he}")).split("\0")
    texts += [" Answer:", " ID", " is", " ", ",", ".", "\n"]
    texts += [c for c in map(chr, range(33, 127))] + [" " + chr(c) for c in range(33, 127)]
    return {p for t in texts for p in pieces(t)}


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The kcap vocabulary: every piece of the pools, templates and questions (no symbols)."""
    return Tokenizer(_corpus_pieces())
