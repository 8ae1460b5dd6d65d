"""bioR(N): imported rewrites of the bioS(N) biographies (the paper's LLaMA rewrites).

kcap cannot write these offline, so they are imported once from a JSON Lines file,
one ``{"person": i, "text": "..."}`` per line (person i of bioS(N, seed), any number of
rewrites per person):

  kcap data import-bior FILE.jsonl --n N [--seed S] --out DIR

(``kcap.data.bior_import``). The import tokenizes every rewrite, labels the first full name
(NAME) and the first occurrence of each attribute value (VALUE + a), and writes DIR with
``bior.json`` (what was imported) and ``rewrites.npz``. A training config then names it:
``[data] kind = "bioR"``, ``n = N``, ``seed = S``, ``bior = "DIR"``.

``BioR`` serves the import like a BioS: person p at exposure e is its rewrite e mod k_p
(k_p its rewrite count, in file order). People and values are bioS(N, seed)'s, without the
gender (a rewrite need not express it), so the capacity metric is bioS's with five counted
attributes, as for the ``fullname`` variant. The metric evaluates exposure 0, each person's
first rewrite: it should name the person before giving a value, as bioS does.

A hand-written sample of four people: ``SAMPLE_PATH``, to import with ``--n 4 --seed 0``
(``SAMPLE_N``, ``SAMPLE_SEED``):

  python -c "import kcap.data.bior as b; print(b.SAMPLE_PATH)"
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from kcap.data import counter_rng as rng
from kcap.data.arguments import check_int, check_people
from kcap.data.bios import BioS, BioSConfig
from kcap.data.labels import NAME, SPECIAL, TEXT, VALUE, TokenLabels
from kcap.data.pools import N_FULL_NAMES
from kcap.data.token_table import Rendered, ragged_arange
from kcap.data.tokenizer import EOS_ID

FORMAT, VERSION = "kcap-bior", 1
META, ARRAYS = "bior.json", "rewrites.npz"
MAX_TOKENS = 1024  # a rewrite's tokens, EOS included; bioS biographies hold ~60
SAMPLE_PATH = Path(str(resources.files("kcap.data").joinpath("samples", "bior_sample.jsonl")))
SAMPLE_N, SAMPLE_SEED = 4, 0
# rewrites.npz: name -> dtype; the digest hashes them in this order
_ARRAY_DTYPES = {"tokens": np.dtype("<i4"), "field": np.dtype("<i2"),
                 "offsets": np.dtype("<i8"), "person": np.dtype("<i8")}


@dataclass(frozen=True)
class BioRConfig:
    """What identifies a bioR data set: its bioS people (n, seed) and the SHA-256 of its
    rewrites (not the folder, so a moved import still resumes a run)."""
    n: int
    seed: int
    digest: str


def rewrites_digest(arrays: dict) -> str:
    """Hex SHA-256 of the rewrite arrays (tokens, field, offsets, person), dtypes fixed."""
    h = hashlib.sha256()
    for name, dtype in _ARRAY_DTYPES.items():
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(arrays[name], dtype=dtype).tobytes())
    return h.hexdigest()


def read_meta(folder) -> dict:
    """The ``bior.json`` of an import folder; ValueError if it is not one."""
    path = Path(folder) / META
    if not Path(folder).is_dir():
        raise ValueError(f"bioR import {str(folder)!r} does not exist or is not a folder; "
                         "write it with `kcap data import-bior FILE.jsonl --n N --out DIR`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{str(folder)!r} is not a bioR import (no {META}); write it with "
                         "`kcap data import-bior`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); import the file again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bioR import description (format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: format version {meta.get('version')!r}; this kcap reads "
                         f"version {VERSION}: import the file again")
    for key in ("n", "seed", "digest", "rewrites_per_person"):
        if key not in meta:
            raise ValueError(f"{path} lacks {key!r}; import the file again")
    return meta


class BioR:
    """Imported bioR rewrites of bioS(N, seed)'s people; build with ``BioR.load``.

    Arrays (one row per rewrite, sorted by person): ``tokens`` (T,) int32 all rewrites,
    each ending in EOS; ``field`` (T,) int16 labels (kcap.data.labels); ``offsets`` (R + 1,)
    int64 where each rewrite starts in ``tokens``; ``person`` (R,) int64.
    """

    kind = "bioR"

    def __init__(self, config: BioRConfig, tokens, field, offsets, person):
        if not isinstance(config, BioRConfig):
            raise TypeError(f"config must be a BioRConfig, got {type(config).__name__}")
        check_int("n", config.n, 1, N_FULL_NAMES)
        check_int("seed", config.seed, 0, rng.MAX_SEED)
        self._bios = BioS(BioSConfig(n=config.n, seed=config.seed, variant="fullname"))
        self.config, self.n_people = config, config.n
        self.tokenizer, self.pools = self._bios.tokenizer, self._bios.pools
        self.n_names = N_FULL_NAMES
        # bioS's fullname list: five counted attributes and the work city (chain rule), no gender
        self.attributes = list(self._bios.attributes)
        arrays = {}
        for name, value in (("tokens", tokens), ("field", field), ("offsets", offsets),
                            ("person", person)):
            value = np.asarray(value)
            if value.ndim != 1 or (value.size and not np.issubdtype(value.dtype, np.integer)):
                raise TypeError(f"{name} must be a 1-d integer array, got {value.ndim}-d "
                                f"{value.dtype}")
            arrays[name] = value.astype(_ARRAY_DTYPES[name].newbyteorder("="), copy=False)
        self._tokens, self._field = arrays["tokens"], arrays["field"]
        self._offsets, self._person = arrays["offsets"], arrays["person"]
        self._check()
        self._lengths = np.diff(offsets)
        # rewrite k of person p is row _first[p] + k
        self._first = np.searchsorted(person, np.arange(self.n_people + 1))
        self._counts = np.diff(self._first)

    @classmethod
    def load(cls, folder, n: int, seed: int) -> "BioR":
        """The import in ``folder`` for bioS(n, seed)'s people; ValueError if the folder is
        not an intact import or was imported for another n or seed."""
        check_int("n", n, 1, N_FULL_NAMES)
        check_int("seed", seed, 0, rng.MAX_SEED)
        meta = read_meta(folder)
        if (meta["n"], meta["seed"]) != (n, seed):
            raise ValueError(f"bioR import {str(folder)!r} holds rewrites of bioS(n={meta['n']}, "
                             f"seed={meta['seed']}), but the config asks for n={n}, seed={seed}: "
                             f"set data.n and data.seed to match, or import again with --n {n} "
                             f"--seed {seed}")
        path = Path(folder) / ARRAYS
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in _ARRAY_DTYPES}
        except FileNotFoundError:
            raise ValueError(f"{path} is missing; import the file again") from None
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); import the "
                             "file again") from None
        for k, dtype in _ARRAY_DTYPES.items():
            if arrays[k].ndim != 1 or arrays[k].dtype != dtype:
                raise ValueError(f"{path}: {k} must be a 1-d {dtype} array, got "
                                 f"{arrays[k].ndim}-d {arrays[k].dtype}; import the file again")
        if rewrites_digest(arrays) != meta["digest"]:
            raise ValueError(f"{path} does not match the SHA-256 recorded in {META} (the files "
                             "were changed or damaged); import the file again")
        return cls(BioRConfig(n, seed, meta["digest"]), **arrays)

    def _check(self):
        """Refuse arrays that break the invariants the renderer relies on."""
        t, f, o, p = self._tokens, self._field, self._offsets, self._person
        problems = []
        if len(f) != len(t):
            problems.append("field and tokens differ in length")
        if len(o) != len(p) + 1 or o[0] != 0 or o[-1] != len(t) or np.any(np.diff(o) < 1):
            problems.append("offsets must rise from 0 to len(tokens), one step per rewrite")
        elif np.any(t[o[1:] - 1] != EOS_ID):
            problems.append("every rewrite must end in EOS")
        if len(p) and (np.any(np.diff(p) < 0) or p[0] < 0 or p[-1] >= self.n_people):
            problems.append(f"person must be sorted and lie in [0, {self.n_people})")
        elif len(np.unique(p)) != self.n_people:
            problems.append("every person needs at least one rewrite")
        if len(t) and (t.min() < 0 or t.max() >= self.tokenizer.vocab_size):
            problems.append(f"token ids must lie in [0, {self.tokenizer.vocab_size})")
        allowed = [TEXT, NAME, SPECIAL] + [VALUE + a for a in range(len(self.attributes))]
        if not np.isin(f, allowed).all():
            problems.append("field holds labels other than TEXT, NAME, SPECIAL and the values")
        if problems:
            raise ValueError("bioR rewrites are inconsistent: " + "; ".join(problems))

    # --- people ----------------------------------------------------------------------------
    def profiles(self, persons) -> dict[str, np.ndarray]:
        """Pool indices of each person's name parts and values, int64 (B,) (bioS's)."""
        return self._bios.profiles(persons)

    def rewrites(self, person: int) -> int:
        """How many rewrites ``person`` has."""
        check_int("person", person, 0, self.n_people - 1)
        return int(self._counts[person])

    def _rows(self, persons, exposures) -> np.ndarray:
        """(B,) rewrite row of each (person, exposure): rewrite e mod k_p of person p."""
        persons, exposures = check_people(persons, exposures, self.n_people)
        return self._first[persons] + exposures % self._counts[persons]

    # --- rendering -------------------------------------------------------------------------
    def render(self, persons, exposures, labels: bool = False) -> Rendered:
        """Token ids of the rewrites of ``persons`` at ``exposures`` (each ending in EOS).

        persons, exposures: (B,) ints (exposures may be a scalar). Returns a Rendered with
        tokens (n,) int32, lengths (B,) int64 and, if ``labels``, a TokenLabels (n,): field
        int16, chunk int16 (0 on values, -1 elsewhere), person int64.
        """
        persons, exposures = check_people(persons, exposures, self.n_people)
        rows = self._rows(persons, exposures)
        lengths = self._lengths[rows]
        index = ragged_arange(self._offsets[rows], lengths)
        tokens = self._tokens[index]
        if not labels:
            return Rendered(tokens, lengths)
        field = self._field[index]
        chunk = np.where(field >= VALUE, 0, -1).astype(np.int16)
        return Rendered(tokens, lengths, TokenLabels(field, chunk, np.repeat(persons, lengths)))

    def lengths(self, persons, exposures) -> np.ndarray:
        """Token count (B,) int64 of each rewrite, EOS included, without rendering it."""
        return self._lengths[self._rows(persons, exposures)]

    def max_length(self) -> int:
        """Tokens of the longest rewrite, EOS included."""
        return int(self._lengths.max())

    def used_token_ids(self) -> np.ndarray:
        """Sorted distinct token ids (int64) of all rewrites, EOS included."""
        return np.unique(self._tokens).astype(np.int64)

    def text(self, person: int, exposure: int) -> str:
        """One rewrite as text, ending in "<|endoftext|>" (as BioS.text)."""
        check_int("person", person, 0, self.n_people - 1)
        check_int("exposure", exposure, 0)
        return self.tokenizer.decode(self.render([person], [exposure]).tokens)

    @property
    def n_rewrites(self) -> int:
        return len(self._person)

