"""bioD(N, K, C, D, L, T): the parametrized biographies of Part 3.3 (spec section 2).

N names from the same N0 pool as bioS; K attributes "ID 1" .. "ID K"; an alphabet of T
symbols (one token each, written ``<t>``); attribute a owns a set D_a of D distinct chunks,
each L symbols, drawn uniformly without replacement from T^L; a person's value for a is C
chunks, each uniform over D_a (independently). One fixed template per sentence:

    Anya Briar Forger's ID 7 is <12><3>,<40><7>.

**kcap choice**: the order of the K sentences is drawn afresh at every exposure (as online
bioS does); the full name is repeated in every sentence, labelled NAME only in the first.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kcap.data import counter_rng as rng
from kcap.data.arguments import check_int, check_people
from kcap.data.bios import distinct_values
from kcap.data.labels import SPECIAL, TEXT, VALUE, Attribute, TokenLabels
from kcap.data.memory_budget import RENDER_BYTES_PER_TOKEN, check_memory
from kcap.data.pools import N_FULL_NAMES, load_pools, split_name_id
from kcap.data.token_table import Rendered, TokenTable, add_name_rows
from kcap.data.tokenizer import EOS_ID, Tokenizer, default_tokenizer

MAX_K = 99  # attribute numbers are single tokens " 1" .. " 99"
MAX_C = (1 << 15) - 1  # chunk indices are int16 labels
_EXACT_LIMIT = 1 << 62  # chunk spaces up to this size are sampled through a permutation
_SPACE_CAP = 1 << 1024  # T^L is only compared with D and _EXACT_LIMIT: larger is as good
# Constructor memory (bytes, fitted with tracemalloc and rounded up): each of the K*D chunk
# rows lives in Python lists while the table is built, a row base plus a cost per symbol;
# each of the T alphabet symbols costs a tokenizer entry; drawing D codes takes temporaries.
_ROW_BYTES, _ROW_SYMBOL_BYTES, _SYMBOL_BYTES, _DRAW_BYTES = 160, 80, 64, 128
_LENGTHS_CHUNK_ENTRIES = 1 << 22  # lengths() gathers at most this many entries at a time


@dataclass(frozen=True)
class BioDConfig:
    n: int   # people, 1 .. N0
    k: int   # attributes, 1 .. MAX_K
    c: int   # chunks per value, 1 .. MAX_C
    d: int   # distinct chunks per attribute, 1 .. T^L
    l: int   # symbols per chunk  # noqa: E741
    t: int   # alphabet size
    seed: int = 0  # 0 .. 2**63 - 1


def chunk_space(t: int, l: int) -> int:  # noqa: E741
    """T^L exactly, or 2**1024 when larger (cheap even for a huge L)."""
    if t > 1 and l * (t.bit_length() - 1) >= 1024:  # T^L >= 2**(L * floor(log2 T))
        return _SPACE_CAP
    return min(t ** l, _SPACE_CAP)


def biography_tokens(c: BioDConfig) -> int:
    """An upper bound on the tokens of one biography: K sentences of a 3-token name, a
    6-token "'s ID a is ", C chunks of L symbols, C - 1 commas and a period; then EOS."""
    return c.k * (c.c * (c.l + 1) + 10) + 1


def memory_estimate(c: BioDConfig) -> dict[str, tuple[int, str]]:
    """Bytes the constructor and one rendering need, by part: {part: (bytes, what to lower)}."""
    return {"its K x D chunks of L symbols": (
                c.k * c.d * (_ROW_BYTES + _ROW_SYMBOL_BYTES * c.l) + c.d * _DRAW_BYTES, "K, D or L"),
            "its alphabet of T symbols": (c.t * _SYMBOL_BYTES, "T"),
            "one biography of K x C chunks of L symbols": (
                RENDER_BYTES_PER_TOKEN * biography_tokens(c), "K, C or L")}


@functools.lru_cache(maxsize=8)
def biod_tokenizer(n_symbols: int) -> Tokenizer:
    return default_tokenizer().with_symbols(n_symbols)


class BioD:
    """The bioD data set; see the module docstring."""

    kind = "bioD"

    def __init__(self, config: BioDConfig):
        if not isinstance(config, BioDConfig):
            raise TypeError(f"config must be a BioDConfig, got {type(config).__name__}")
        c = config
        check_int("n", c.n, 1, N_FULL_NAMES)
        check_int("k", c.k, 1, MAX_K)
        check_int("c", c.c, 1, MAX_C)
        check_int("l", c.l, 1)
        check_int("t", c.t, 1)
        check_int("seed", c.seed, 0, rng.MAX_SEED)
        self.space = chunk_space(c.t, c.l)
        check_int("d", c.d, 1, self.space)  # D distinct chunks need D <= T^L
        parts = memory_estimate(c)
        part, (_, lower) = max(parts.items(), key=lambda item: item[1][0])
        check_memory(sum(b for b, _ in parts.values()),
                     f"bioD with K={c.k:,}, C={c.c:,}, D={c.d:,}, L={c.l:,}, T={c.t:,} (mostly "
                     f"{part})", lower)
        self.config = c
        self.n_people = c.n
        self.n_names = N_FULL_NAMES
        self.tokenizer = biod_tokenizer(c.t)
        self.pools = load_pools()
        self._keys = {t: rng.stream_key(c.seed, "bioD/" + t)
                      for t in ("names", "chunks", "values", "order")}
        self.attributes = [Attribute(f"ID {a + 1}", c.d ** c.c) for a in range(c.k)]
        self.chunks = self._draw_chunks()  # (K, D, L) symbol indices
        self._build_table()

    def _draw_chunks(self) -> np.ndarray:
        c = self.config
        out = np.empty((c.k, c.d, c.l), dtype=np.int64)
        for a in range(c.k):
            key = rng.hash64(self._keys["chunks"], a)[()]
            if self.space <= _EXACT_LIMIT:  # D distinct codes of [0, T^L), then base-T digits
                codes = rng.permute(int(key), self.space, np.arange(c.d))
                powers = c.t ** np.arange(c.l - 1, -1, -1, dtype=np.int64)
                out[a] = (codes[:, None] // powers[None, :]) % c.t
                continue
            rows = rng.uniform_int(int(key), c.t, np.arange(c.d)[:, None], np.arange(c.l)[None, :], 0)
            draw = 1
            while True:  # astronomically rare: redraw duplicated rows until all distinct
                _, first = np.unique(rows, axis=0, return_index=True)
                dup = np.setdiff1d(np.arange(c.d), first)
                if not dup.size:
                    break
                rows[dup] = rng.uniform_int(int(key), c.t, dup[:, None], np.arange(c.l)[None, :], draw)
                draw += 1
            out[a] = rows
        return out

    def _build_table(self):
        c, tok, pools = self.config, self.tokenizer, self.pools
        table = TokenTable()
        pid = tok.piece_id
        self._name_base = add_name_rows(table, tok, pools)
        intro = [tok.encode_known(f"'s ID {a + 1} is ") for a in range(c.k)]
        self._intro = np.array([table.add(ids, [TEXT] * len(ids)) for ids in intro])
        self._chunk_base = np.array([table.add_block(tok.symbol_ids(self.chunks[a]), VALUE + a)
                                     for a in range(c.k)])
        self._comma = table.add([pid(",")], [TEXT])
        self._period = table.add([pid(".")], [TEXT])
        self._eos = table.add([EOS_ID], [SPECIAL])
        self._table = table.freeze()

    def profiles(self, persons) -> dict[str, np.ndarray]:
        """Name part indices (B,) and chunk choices ``values`` (B, K, C), int64."""
        persons, _ = check_people(persons, 0, self.n_people)
        name_id = rng.permute(self._keys["names"], N_FULL_NAMES, persons)
        first, middle, last = split_name_id(name_id)
        c = self.config
        values = rng.uniform_int(self._keys["values"], c.d, persons[:, None, None],
                                 np.arange(c.k)[None, :, None], np.arange(c.c)[None, None, :])
        return {"name_id": name_id, "first": first, "middle": middle, "last": last,
                "values": values}

    def _order(self, persons, exposures) -> np.ndarray:
        return rng.random_order(self._keys["order"], persons, exposures, width=self.config.k)

    def max_length(self) -> int:
        """Tokens in one biography (all bioD biographies have this length), EOS included."""
        return int(self.render([0], [0]).lengths[0])

    def text(self, person: int, exposure: int) -> str:
        """One biography as text (plain Python; the reference for ``render``)."""
        persons, exposures = check_people([person], [exposure], self.n_people)
        prof = self.profiles(persons)
        name = self.pools.full_name(int(prof["name_id"][0]))
        sentences = []
        for a in self._order(persons, exposures)[0]:
            value = ",".join("".join(f"<{s}>" for s in self.chunks[a, v])
                             for v in prof["values"][0, a])
            sentences.append(f"{name}'s ID {a + 1} is {value}.")
        return " ".join(sentences) + "<|endoftext|>"

    def render(self, persons, exposures, labels: bool = False) -> Rendered:
        """Token ids of the biographies of ``persons`` at ``exposures``; see bios.BioS.render."""
        persons, exposures = check_people(persons, exposures, self.n_people)
        c, B = self.config, len(persons)
        index, lengths, slot_lengths = self._table.gather(self._entries(persons, exposures))
        tokens = self._table.tokens[index]
        if not labels:
            return Rendered(tokens, lengths)
        slot_chunk = np.full((B, c.k, 4 + 2 * c.c), -1, np.int16)
        slot_chunk[:, :, 4::2] = np.arange(c.c, dtype=np.int16)
        slot_chunk = np.concatenate([slot_chunk.reshape(B, -1), np.full((B, 1), -1, np.int16)], 1)
        chunk = np.repeat(slot_chunk.reshape(-1), slot_lengths)
        return Rendered(tokens, lengths, TokenLabels(self._table.fields[index], chunk,
                                                     np.repeat(persons, lengths)))

    def lengths(self, persons, exposures) -> np.ndarray:
        """Token count (B,) int64 of each biography, without rendering it."""
        persons, exposures = check_people(persons, exposures, self.n_people)
        c = self.config
        step = max(1, _LENGTHS_CHUNK_ENTRIES // (c.k * (4 + 2 * c.c) + 1))  # bounded memory
        out = np.empty(len(persons), np.int64)
        for lo in range(0, len(persons), step):
            entries = self._entries(persons[lo:lo + step], exposures[lo:lo + step])
            out[lo:lo + step] = self._table.lengths[entries].sum(axis=1)
        return out

    def _entries(self, persons, exposures) -> np.ndarray:
        c, B = self.config, len(persons)
        prof = self.profiles(persons)
        order = self._order(persons, exposures)  # (B, K)
        width = 4 + 2 * c.c
        ent = np.empty((B, c.k, width), dtype=np.int64)
        for i, part in enumerate(("first", "middle", "last")):
            ent[:, :, i] = self._name_base[3 + i] + prof[part][:, None]
            ent[:, 0, i] = self._name_base[i] + prof[part]
        ent[:, :, 3] = self._intro[order]
        chosen = np.take_along_axis(prof["values"], order[:, :, None], axis=1)  # (B, K, C)
        ent[:, :, 4::2] = self._chunk_base[order][:, :, None] + chosen
        ent[:, :, 5::2] = self._comma
        ent[:, :, -1] = self._period
        return np.concatenate([ent.reshape(B, -1), np.full((B, 1), self._eos)], axis=1)

    def used_token_ids(self) -> np.ndarray:
        """Sorted ids the data can emit: template pieces, EOS, the N people's name parts and
        the symbols of the K*D chunks."""
        parts = ("first", "middle", "last")
        # profiles() also draws the (chunk, K, C) values: keep chunks of people small.
        prof = distinct_values(self, parts, chunk=max(1, (1 << 22) // (self.config.k * self.config.c)))
        entries = [self._intro, [self._comma, self._period, self._eos]]
        for i, part in enumerate(parts):
            entries.append(self._name_base[i] + prof[part])
            if self.config.k > 1:  # later sentences repeat the name, spaced
                entries.append(self._name_base[3 + i] + prof[part])
        ids = [self._table.entry_tokens(np.concatenate(entries)),
               self.tokenizer.symbol_ids(np.unique(self.chunks))]
        return np.unique(np.concatenate(ids))
