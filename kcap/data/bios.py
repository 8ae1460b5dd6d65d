"""bioS(N): synthetic biographies of N people with uniformly random, independent attributes.

Profiles are a pure function of (N, seed): person i's full name is entry
``permute(N0)[offset + i]`` of a keyed permutation of the N0 = 1.6e8 names (so N names are
drawn without replacement, and a junk set placed at ``person_offset=N`` never reuses a
useful name); each attribute is a keyed hash of the person. A rendering is a pure function
of (profile, exposure, seed): six sentences, one per attribute, each from ~50 templates,
the full name in the first sentence only and pronouns after.

Variants (``BioSConfig.variant``, joined with '+'): ``online`` (fresh templates and sentence
order at every exposure; the default of Part 3.3), ``simple`` (one fixed rendering),
``multiM`` (M fixed renderings, exposure e uses e mod M), ``permute`` (shuffled sentence
order), ``fullname`` (pronouns replaced by the full name; then no gender is expressed and
its bit is not counted).

Two renderers that tests hold together: ``text`` (plain Python string formatting, the
reference) and ``render`` (vectorized gather over pre-tokenized tables, the fast path).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from kcap.data import counter_rng as rng
from kcap.data.arguments import check_int, check_people
from kcap.data.labels import PRONOUN, SPECIAL, TEXT, VALUE, Attribute, TokenLabels
from kcap.data.pools import (DAYS, FIRST_YEAR, MONTHS, N_BIRTH_DATES, N_FULL_NAMES, YEARS,
                             birth_date_text, load_pools, split_name_id)
from kcap.data.templates import ATTRIBUTES, load_templates
from kcap.data.token_table import Rendered, TokenTable, add_name_rows
from kcap.data.tokenizer import EOS_ID, USEFUL_ID, default_tokenizer

GENDER = len(ATTRIBUTES)  # attribute index of the pronoun's gender, after the six
_PRONOUNS = {"subj": ("He", "She"), "poss": ("His", "Her"), "he": ("he", "she"),
             "his": ("his", "her"), "him": ("him", "her")}
_SPLIT_RE = re.compile(r"(\{(?:subj|poss|he|his|him|value)\})")
MAX_RENDERINGS = 10 ** 9  # multiM: more renderings than any run has exposures
# Columns of the per-person matrix that fills template slots: 0 is "constant".
_COL_FIRST, _COL_MIDDLE, _COL_LAST, _COL_VALUE = 1, 2, 3, 4


@dataclass(frozen=True)
class Variant:
    renderings: int | None  # None: a fresh rendering at every exposure
    permute: bool
    fullname: bool


def parse_variant(spec: str) -> Variant:
    """'online', 'simple', 'multi5', 'permute', 'fullname', or a '+'-joined combination."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"variant must be a non-empty string, got {spec!r}")
    renderings, permute, fullname, seen = 1, False, False, set()
    for part in spec.split("+"):
        if part in seen:
            raise ValueError(f"variant {spec!r} repeats {part!r}")
        seen.add(part)
        if part == "online":
            renderings, permute = None, True
        elif part == "simple":
            renderings = 1
        elif part == "permute":
            permute = True
        elif part == "fullname":
            fullname = True
        elif re.fullmatch(r"multi[1-9][0-9]*", part):
            # bounded before int(): a million digits would stall int() and overflow int64 math
            if len(part) - 5 > len(str(MAX_RENDERINGS)) or int(part[5:]) > MAX_RENDERINGS:
                raise ValueError(f"variant {spec!r}: multiM needs M <= {MAX_RENDERINGS:,} "
                                 "renderings; use 'online' for a fresh rendering at every exposure")
            renderings = int(part[5:])
        else:
            raise ValueError(f"unknown bioS variant part {part!r} in {spec!r}; allowed: online, "
                             "simple, multiM (M >= 1), permute, fullname, joined with '+'")
    if len(seen & {"online", "simple"}) + sum(p.startswith("multi") for p in seen) > 1:
        raise ValueError(f"variant {spec!r}: choose one of online, simple, multiM")
    return Variant(renderings, permute, fullname)


@dataclass(frozen=True)
class BioSConfig:
    n: int                   # number of people, 1 .. N0 - person_offset
    seed: int = 0            # 0 .. 2**63 - 1
    variant: str = "online"
    marker: bool = False     # prepend <|useful|> to every biography (junk experiments)
    person_offset: int = 0   # where this set starts in the name permutation


class BioS:
    """The bioS(N) data set; see the module docstring."""

    kind = "bioS"

    def __init__(self, config: BioSConfig):
        if not isinstance(config, BioSConfig):
            raise TypeError(f"config must be a BioSConfig, got {type(config).__name__}")
        check_int("n", config.n, 1)
        check_int("seed", config.seed, 0, rng.MAX_SEED)
        check_int("person_offset", config.person_offset, 0)
        if config.n + config.person_offset > N_FULL_NAMES:
            raise ValueError(f"n + person_offset must be <= N0 = {N_FULL_NAMES:,} distinct full "
                             f"names, got {config.n + config.person_offset:,}")
        self.config = config
        self.n_people = config.n
        self.variant = parse_variant(config.variant)
        self.tokenizer = default_tokenizer()
        self.pools = load_pools()
        self.templates = load_templates()
        seed = config.seed
        self._keys = {t: rng.stream_key(seed, "bioS/" + t)
                      for t in ("names", "attributes", "templates", "order")}
        self.attributes = [Attribute(a, c) for a, c in zip(
            ATTRIBUTES[:5], (N_BIRTH_DATES, 200, 300, 100, 263))]
        self.attributes.append(Attribute("work_city", 263, counted=False, determined_by="employer"))
        if not self.variant.fullname:
            self.attributes.append(Attribute("gender", 2, classes=gender_classes()))
        self.n_names = N_FULL_NAMES
        self._tables = _compiled_tables(self.variant.fullname)

    # --- profiles ---------------------------------------------------------------------
    def profiles(self, persons) -> dict[str, np.ndarray]:
        """Pool indices of each person's name parts and attribute values, int64 (B,)."""
        persons, _ = check_people(persons, 0, self.n_people)
        g = persons + self.config.person_offset
        name_id = rng.permute(self._keys["names"], N_FULL_NAMES, g)
        first, middle, last = split_name_id(name_id)
        out = {"name_id": name_id, "first": first, "middle": middle, "last": last}
        for a, attr in enumerate(self.attributes[:5]):
            out[attr.name] = rng.uniform_int(self._keys["attributes"], attr.cardinality, g, a)
        out["work_city"] = out["employer"]
        out["gender"] = rng.uniform_int(self._keys["attributes"], 2, g, GENDER)
        return out

    def _choices(self, persons, exposures):
        """Sentence order (B, 6) of attribute ids and the template of each sentence."""
        g = persons + self.config.person_offset
        r = exposures if self.variant.renderings is None else exposures % self.variant.renderings
        if self.variant.permute:
            order = rng.random_order(self._keys["order"], g, r, width=len(ATTRIBUTES))
        else:
            order = np.broadcast_to(np.arange(len(ATTRIBUTES)), (len(g), len(ATTRIBUTES)))
        counts = np.array([len(self.templates[a]) for a in ATTRIBUTES])
        tmpl = rng.uniform_int(self._keys["templates"], counts[None, :], g[:, None],
                               r[:, None], np.arange(len(ATTRIBUTES))[None, :])
        return order, np.take_along_axis(tmpl, order, axis=1)

    # --- reference renderer -------------------------------------------------------------
    def text(self, person: int, exposure: int) -> str:
        """One biography as text (plain Python; the reference for ``render``)."""
        persons, exposures = check_people([person], [exposure], self.n_people)
        prof = {k: int(v[0]) for k, v in self.profiles(persons).items()}
        order, tmpl = (x[0] for x in self._choices(persons, exposures))
        name = self.pools.full_name(prof["name_id"])
        values = [birth_date_text(prof["birth_date"]), self.pools.birth_cities[prof["birth_city"]],
                  self.pools.universities[prof["university"]], self.pools.majors[prof["major"]],
                  self.pools.employers[prof["employer"]],
                  self.pools.employer_cities[prof["employer"]]]
        sentences = []
        for k, (a, t) in enumerate(zip(order, tmpl)):
            def fill(match, first=k == 0):
                slot = match.group(0)[1:-1]
                if slot == "value":
                    return values[a]
                if (slot in ("subj", "poss") and first) or self.variant.fullname:
                    return name + "'s" if slot in ("poss", "his") else name
                return _PRONOUNS[slot][prof["gender"]]
            sentences.append(_SPLIT_RE.sub(fill, self.templates[ATTRIBUTES[a]][t]))
        marker = "<|useful|>" if self.config.marker else ""
        return marker + " ".join(sentences) + "<|endoftext|>"

    # --- fast renderer ------------------------------------------------------------------
    def render(self, persons, exposures, labels: bool = False) -> Rendered:
        """Token ids of the biographies of ``persons`` at ``exposures`` (each ending in EOS).

        persons, exposures: (B,) ints (exposures may be a scalar). Returns a Rendered with
        tokens (n,) int32, lengths (B,) and, if ``labels``, the label stream.
        """
        persons, exposures = check_people(persons, exposures, self.n_people)
        t = self._tables
        index, lengths, _ = t.table.gather(self._entries(persons, exposures))
        tokens = t.table.tokens[index]
        if not labels:
            return Rendered(tokens, lengths)
        field = t.table.fields[index]
        pronouns = np.flatnonzero(field == PRONOUN)
        if pronouns.size:  # the first pronoun of a biography expresses the gender
            bio = np.searchsorted(np.cumsum(lengths), pronouns, side="right")
            first = np.ones(len(pronouns), bool)
            first[1:] = bio[1:] != bio[:-1]
            field[pronouns] = TEXT
            field[pronouns[first]] = VALUE + GENDER
        chunk = np.where(field >= VALUE, 0, -1).astype(np.int16)
        return Rendered(tokens, lengths, TokenLabels(field, chunk, np.repeat(persons, lengths)))

    def lengths(self, persons, exposures) -> np.ndarray:
        """Token count (B,) of each biography, without rendering it."""
        persons, exposures = check_people(persons, exposures, self.n_people)
        return self._tables.table.lengths[self._entries(persons, exposures)].sum(axis=1)

    def max_length(self) -> int:
        """An upper bound on the tokens of one biography (marker and EOS included)."""
        t = self._tables
        block_max = np.zeros(t.col.max() + 1, np.int64)
        block_max[_COL_FIRST:_COL_VALUE] = 1  # every name part is one token
        sizes = [N_BIRTH_DATES] + [len(p) for p in (self.pools.birth_cities, self.pools.universities,
                                                      self.pools.majors, self.pools.employers,
                                                      self.pools.employer_cities)]
        for a, (b, size) in enumerate(zip(t.value_base, sizes)):
            block_max[_COL_VALUE + a] = t.table.lengths[b:b + size].max()
        slot_max = np.where(t.col == 0, t.table.lengths[t.base], block_max[t.col])
        per_sentence = slot_max.sum(axis=-1).reshape(len(ATTRIBUTES), -1).max(axis=1)
        return int(per_sentence.sum()) + 1 + int(self.config.marker)

    def _entries(self, persons, exposures) -> np.ndarray:
        """(B, slots) entry ids of the biographies (checked inputs)."""
        B = len(persons)
        t = self._tables
        prof = self.profiles(persons)
        fill = np.zeros((B, _COL_VALUE + len(ATTRIBUTES)), dtype=np.int64)
        fill[:, _COL_FIRST], fill[:, _COL_MIDDLE], fill[:, _COL_LAST] = (
            prof["first"], prof["middle"], prof["last"])
        for a, attr in enumerate(ATTRIBUTES):
            fill[:, _COL_VALUE + a] = prof[attr]
        order, tmpl = self._choices(persons, exposures)
        form = (np.arange(len(ATTRIBUTES)) > 0).astype(np.int64)[None, :]
        gender = prof["gender"][:, None]
        base = t.base[order, tmpl, form, gender]  # (B, 6, S)
        col = t.col[order, tmpl, form, gender]
        body = base + np.take_along_axis(fill, col.reshape(B, -1), axis=1).reshape(base.shape)
        parts = [body.reshape(B, -1), np.full((B, 1), t.eos, np.int64)]
        if self.config.marker:
            parts.insert(0, np.full((B, 1), t.marker, np.int64))
        return np.concatenate(parts, axis=1)

    def used_token_ids(self) -> np.ndarray:
        """Sorted ids this data set can emit: every template piece of its variant, EOS (and
        the marker), and the name parts and values of its N people."""
        t = self._tables
        prof = distinct_values(self, ("first", "middle", "last") + ATTRIBUTES)
        entries = [t.text_entries, [t.eos] + ([t.marker] if self.config.marker else [])]
        entries += [t.name_base[i] + prof[k] for i, k in enumerate(("first", "middle", "last"))]
        if self.variant.fullname:  # repeated names come from the spaced, TEXT-labelled rows
            entries += [t.name_base[3 + i] + prof[k]
                        for i, k in enumerate(("first", "middle", "last"))]
        entries += [t.value_base[a] + prof[attr] for a, attr in enumerate(ATTRIBUTES)]
        return t.table.entry_tokens(np.concatenate([np.asarray(x, np.int64) for x in entries]))


@functools.lru_cache(maxsize=1)
def gender_classes() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Token ids of every pronoun the templates can write (capitalised or not, with or
    without the leading space), male then female: the gender value's two classes."""
    tok = default_tokenizer()
    classes = []
    for gender in (0, 1):
        ids = set()
        for word in {pair[gender] for pair in _PRONOUNS.values()}:
            for text in (word, " " + word):
                encoded = tok.encode_known(text)
                if len(encoded) != 1:  # the metric scores the gender on one token
                    raise ValueError(f"pronoun {text!r} must be one token, got {encoded}")
                ids.add(encoded[0])
        classes.append(tuple(sorted(ids)))
    if set(classes[0]) & set(classes[1]):
        raise ValueError("a pronoun token expresses both genders")
    return classes[0], classes[1]


def distinct_values(dataset, keys, chunk: int = 1 << 20) -> dict[str, np.ndarray]:
    """Sorted distinct values of profile columns over all people of ``dataset``, computed
    ``chunk`` people at a time so that memory stays bounded for N in the millions."""
    seen = {k: np.empty(0, np.int64) for k in keys}
    for lo in range(0, dataset.n_people, chunk):
        prof = dataset.profiles(np.arange(lo, min(lo + chunk, dataset.n_people)))
        for k in keys:
            seen[k] = np.union1d(seen[k], prof[k])
    return seen


@dataclass
class _Tables:
    table: TokenTable
    base: np.ndarray        # (6, T, 2 forms, 2 genders, S) entry base of each slot
    col: np.ndarray         # same shape: column of the fill matrix added to base
    name_base: list[int]    # first bare, middle, last (NAME); first, middle, last (TEXT)
    value_base: list[int]
    text_entries: list[int]
    eos: int
    marker: int


@functools.lru_cache(maxsize=2)
def _compiled_tables(fullname: bool) -> _Tables:
    """Pre-tokenize pools and every (template, first-or-later sentence, gender) slot list."""
    tok, pools, templates = default_tokenizer(), load_pools(), load_templates()
    table = TokenTable()
    pid = tok.piece_id
    name_base = add_name_rows(table, tok, pools)
    # Birth dates compose " Month", " D", ",", " YYYY" in the order of birth_date_text.
    month, day, year = np.meshgrid([pid(" " + m) for m in MONTHS],
                                   [pid(f" {d + 1}") for d in range(DAYS)],
                                   [pid(f" {FIRST_YEAR + y}") for y in range(YEARS)], indexing="ij")
    dates = np.stack([month.ravel(), day.ravel(), np.full(month.size, pid(",")), year.ravel()], 1)
    value_pools = [pools.birth_cities, pools.universities, pools.majors, pools.employers,
                   pools.employer_cities]
    value_base = [table.add_block(dates, VALUE)]
    value_base += [table.add_block([tok.encode_known(" " + v) for v in pool], VALUE + a + 1)
                   for a, pool in enumerate(value_pools)]

    slot_lists, text_entries = {}, []
    for a, attr in enumerate(ATTRIBUTES):
        for t, template in enumerate(templates[attr]):
            for form in (0, 1):
                for gender in (0, 1):
                    slots = _compile_template(template, table, tok, form, gender, fullname,
                                              name_base, (value_base[a], _COL_VALUE + a))
                    slot_lists[a, t, form, gender] = slots
                    text_entries += [b for b, c in slots if c == 0]
    width = max(len(s) for s in slot_lists.values())
    n_templates = max(len(ts) for ts in templates.values())
    base = np.zeros((len(ATTRIBUTES), n_templates, 2, 2, width), np.int64)
    col = np.zeros_like(base)
    for key, slots in slot_lists.items():
        for s, (b, c) in enumerate(slots):
            base[key + (s,)], col[key + (s,)] = b, c
    eos, marker = table.add([EOS_ID], [SPECIAL]), table.add([USEFUL_ID], [SPECIAL])
    return _Tables(table.freeze(), base, col, name_base, value_base, text_entries, eos, marker)


def _compile_template(template, table, tok, form, gender, fullname, name_base, value_slot):
    """Slot list [(entry base, fill column)] of one template in one form and gender.

    form 0: the first sentence (the subject is the bare full name, labelled NAME);
    form 1: a later sentence (pronouns, or the spaced full name labelled TEXT if fullname).
    Literal text between placeholders becomes table entries (column 0).
    """
    slots, ids, fields = [], [], []

    def flush():
        if ids:
            slots.append((table.add(ids, fields), 0))
            ids.clear(), fields.clear()

    def text(s, field=TEXT):
        new = tok.encode_known(s)
        ids.extend(new), fields.extend([field] * len(new))

    # A placeholder owns the space before it (a space starts a token); the first one of a
    # later sentence owns the space joining it to the sentence before.
    parts = _SPLIT_RE.split(template)
    for k in range(1, len(parts), 2):
        literal, slot = parts[k - 1], parts[k][1:-1]
        spaced = literal.endswith(" ") or (k == 1 and form == 1)
        text(literal[:-1] if literal.endswith(" ") else literal)
        if slot == "value":
            flush()
            slots.append(value_slot)
        elif (slot in ("subj", "poss") and form == 0 and k == 1) or fullname:
            flush()
            rows = name_base[3:] if spaced else name_base[:3]
            slots += list(zip(rows, (_COL_FIRST, _COL_MIDDLE, _COL_LAST)))
            if slot in ("poss", "his"):
                text("'s")
        else:
            word = _PRONOUNS[slot][gender]
            text(" " + word if spaced else word, PRONOUN)
    text(parts[-1])
    flush()
    return slots
