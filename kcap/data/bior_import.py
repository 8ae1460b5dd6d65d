"""``kcap data import-bior``: check, tokenize and label bioR rewrites, then write the import.

Input: JSON Lines (UTF-8), one ``{"person": i, "text": "..."}`` per line, i an index into
bioS(N, seed); blank lines are skipped. Every record is checked and every bad one reported
with its line number; if any is bad, or some person has no rewrite, nothing is written.

Labels: the first occurrence of the full name is NAME and the first occurrence of each value
is VALUE + a; both are matched on whole tokenizer pieces (so "Music" does not match inside
"Musical"), written bare (as at the start of a text or after punctuation) or after a space.

Output: a folder (see kcap.data.bior) written into a temporary sibling and renamed into
place, so a kill leaves no partial folder. An earlier import there is replaced; a kill
between moving it aside and renaming the new one leaves it as ``.DIR.*.old`` beside DIR.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kcap.atomic import _UMASK, atomic_path, write_json
from kcap.data import counter_rng as rng
from kcap.data.arguments import check_int
from kcap.data.bior import (ARRAYS, FORMAT, MAX_TOKENS, META, VERSION, BioR, rewrites_digest)
from kcap.data.bios import BioS, BioSConfig
from kcap.data.labels import NAME, SPECIAL, TEXT, VALUE
from kcap.data.pools import N_FULL_NAMES, birth_date_text
from kcap.data.templates import ATTRIBUTES
from kcap.data.tokenizer import EOS_ID, N_BYTES, SPECIALS, default_tokenizer, pieces

SHOWN_ERRORS = 10


class _Bad(Exception):
    """One record's problem (caught per line, reported with its line number)."""


def value_texts(pools, prof: dict, i: int) -> tuple[str, list[str]]:
    """Full name and the six values (ATTRIBUTES order) of row ``i`` of bioS profiles, as
    the bioS biographies write them."""
    return pools.full_name(int(prof["name_id"][i])), [
        birth_date_text(int(prof["birth_date"][i])), pools.birth_cities[int(prof["birth_city"][i])],
        pools.universities[int(prof["university"][i])], pools.majors[int(prof["major"][i])],
        pools.employers[int(prof["employer"][i])], pools.employer_cities[int(prof["work_city"][i])]]


def _first_span(text_pieces: list[str], at: dict, cum: list[int], target: str, after: int = 0):
    """(start, end) token span and end piece of the first occurrence of ``target`` starting
    at piece ``after`` or later, bare or after a space, as whole pieces of ``text_pieces``;
    None if absent. at: piece -> its positions in text_pieces; cum: token offset of each
    piece (and of the end)."""
    best = None
    for pattern in (pieces(target), pieces(" " + target)):
        m = len(pattern)
        for s in at.get(pattern[0], ()):
            if s < after:
                continue
            if best is not None and s >= best[0]:
                break
            if text_pieces[s:s + m] == pattern:
                best = (s, s + m)
                break
    return None if best is None else ((cum[best[0]], cum[best[1]]), best[1])


def label_rewrite(tokenizer, text: str, name: str, values: list[str], attributes: list[str],
                  max_tokens: int = MAX_TOKENS, cache: dict | None = None):
    """Token ids (n,) int32 of ``text`` + EOS and their field labels (n,) int16.

    name: the full name; values[a]: the text of attribute ``attributes[a]``. Raises _Bad if
    one is missing, two first occurrences overlap, or the text is too long. Where two
    attributes share a text (birth city = work city), the first occurrence is the birth
    city's and the next one, if any, the work city's (the work city is not counted). cache: a dict
    memoising ``tokenizer.encode`` per piece across calls (one tokenizer only).
    """
    cache = {} if cache is None else cache
    text_pieces = pieces(text)
    for piece in text_pieces:
        if piece not in cache:  # unknown pieces become UTF-8 byte tokens
            cache[piece] = tokenizer.encode(piece)
    ids_per_piece = [cache[p] for p in text_pieces]
    at: dict[str, list[int]] = {}
    for s, piece in enumerate(text_pieces):
        at.setdefault(piece, []).append(s)
    cum = np.concatenate([[0], np.cumsum([len(i) for i in ids_per_piece], dtype=np.int64)]).tolist()
    if cum[-1] + 1 > max_tokens:
        raise _Bad(f"the rewrite is {cum[-1] + 1:,} tokens (EOS included); at most {max_tokens:,}")
    spans, missing, taken = [], [], {}
    for label, what, target in [(NAME, "full name", name)] + [
            (VALUE + a, attributes[a].replace("_", " "), v) for a, v in enumerate(values)]:
        # A value whose text an earlier attribute also has (birth city = work city for ~0.2%
        # of people) takes the next occurrence; the work city (not counted) may have none.
        found = _first_span(text_pieces, at, cum, target, taken.get(target, 0))
        if found is None:
            if target not in taken or what != "work city":
                missing.append(f"{what} {target!r}")
            continue
        span, taken[target] = found
        spans.append((span, label, what, target))
    if missing:
        raise _Bad("not found in the text: " + ", ".join(missing))
    spans.sort()
    for (a, _, what_a, t_a), (b, _, what_b, t_b) in zip(spans, spans[1:]):
        if b[0] < a[1]:
            raise _Bad(f"ambiguous: the first {what_a} {t_a!r} and the first {what_b} {t_b!r} "
                       f"overlap (tokens {a[0]}-{a[1] - 1} and {b[0]}-{b[1] - 1}), so which "
                       "attribute they express cannot be told")
    ids = np.fromiter((i for piece in ids_per_piece for i in piece), np.int32, cum[-1])
    field = np.full(cum[-1] + 1, TEXT, np.int16)
    for (lo, hi), label, _, _ in spans:
        field[lo:hi] = label
    field[-1] = SPECIAL
    return np.append(ids, np.int32(EOS_ID)), field


def _parse(raw: bytes, n: int) -> tuple[int, str]:
    """(person, text) of one non-blank line; raises _Bad."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Bad(f"invalid UTF-8 at byte {err.start + 1} of the line") from None

    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise _Bad(f"a key appears twice: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
        return dict(pairs)

    try:
        record = json.loads(line, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as err:
        raise _Bad(f"malformed JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:  # [[[[[...
        raise _Bad("malformed JSON (nested too deeply)") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise _Bad(f"malformed JSON ({err})") from None
    if not isinstance(record, dict):
        raise _Bad(f"a record must be a JSON object {{\"person\": int, \"text\": str}}, got "
                   f"{type(record).__name__}")
    if set(record) != {"person", "text"}:
        extra, absent = sorted(set(record) - {"person", "text"}), sorted({"person", "text"} - set(record))
        raise _Bad("a record has exactly the keys 'person' and 'text'" + (
            f"; missing {absent}" if absent else "") + (f"; unexpected {extra}" if extra else ""))
    person, text = record["person"], record["text"]
    if isinstance(person, bool) or not isinstance(person, int):
        raise _Bad(f"person must be an integer, got {json.dumps(person)}")
    if not 0 <= person < n:
        raise _Bad(f"person {person} is outside [0, {n}) (--n {n})")
    if not isinstance(text, str) or not text.strip():
        raise _Bad(f"text must be a non-empty string, got {json.dumps(text)[:40]}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a JSON escape like "\ud800" decodes to a lone surrogate
        raise _Bad("text holds an unpaired UTF-16 surrogate escape") from None
    special = [s for s in SPECIALS if s in text]
    if special:
        raise _Bad(f"text holds kcap's special token(s) {', '.join(special)}")
    return person, text


def _is_import(folder: Path) -> bool:
    """Whether ``folder`` holds only an earlier import (so it may be replaced)."""
    names = {p.name for p in folder.iterdir()}
    if META not in names or not names <= {META, ARRAYS}:
        return False
    try:
        return json.loads((folder / META).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path):
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_import(out):
        raise ValueError(f"--out {str(out)!r} is a non-empty folder that is not a bioR import; "
                         "choose a new or empty folder")


def _refusal(source: str, errors: list[str]) -> ValueError:
    if len(errors) == 1:
        return ValueError(f"{source}: {errors[0]}; nothing was written")
    lines = [f"{source}: {len(errors)} problems, nothing was written:"]
    lines += ["  " + e for e in errors[:SHOWN_ERRORS]]
    if len(errors) > SHOWN_ERRORS:
        lines.append(f"  and {len(errors) - SHOWN_ERRORS} more")
    return ValueError("\n".join(lines))


def import_bior(path, n: int, seed: int, out, max_tokens: int = MAX_TOKENS) -> dict:
    """Import the rewrites in JSON Lines file ``path`` for bioS(n, seed) into folder
    ``out``; returns what ``bior.json`` records. ValueError (every bad line named) if any
    record is bad or some person has no rewrite; then nothing is written."""
    check_int("n", n, 1, N_FULL_NAMES)
    check_int("seed", seed, 0, rng.MAX_SEED)
    check_int("max_tokens", max_tokens, 2)
    path, out = Path(path), Path(out)
    _check_out(out)  # before the work: a wrong --out fails at once
    data = path.read_bytes()
    # some editors start a file with a byte-order mark; it is not part of line 1's JSON
    body = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    errors, parsed = [], []  # errors: (line number, message)
    for lineno, raw in enumerate(body.split(b"\n"), 1):
        if raw.strip():
            try:
                parsed.append((lineno, *_parse(raw, n)))
            except _Bad as bad:
                errors.append((lineno, str(bad)))
    persons = np.array([p for _, p, _ in parsed], np.int64)
    bios, tok, cache, records = BioS(BioSConfig(n=n, seed=seed)), default_tokenizer(), {}, []
    unique = np.unique(persons)
    prof = bios.profiles(unique)  # one batch: a call per record would cost more than the rest
    row = dict(zip(unique.tolist(), range(len(unique))))
    for lineno, person, text in parsed:
        name, values = value_texts(bios.pools, prof, row[person])
        try:
            ids, field = label_rewrite(tok, text, name, values, ATTRIBUTES, max_tokens, cache)
            records.append((person, ids, field))
        except _Bad as bad:
            errors.append((lineno, f"person {person}: {bad}"))
    problems = [f"line {k}: {message}" for k, message in sorted(errors)]
    seen = np.zeros(n, bool)
    seen[persons] = True
    if not problems and not parsed:
        problems.append("the file holds no records")
    elif not seen.all():
        absent = np.flatnonzero(~seen)
        problems.append(f"{len(absent):,} of {n:,} people have no rewrite (every person in "
                        f"[0, {n}) needs one): " + ", ".join(map(str, absent[:10].tolist()))
                        + (" ..." if len(absent) > 10 else ""))
    if problems:
        raise _refusal(path.name, problems)
    records.sort(key=lambda r: r[0])  # stable: a person's rewrites keep their file order
    lengths = np.array([len(r[1]) for r in records], np.int64)
    arrays = {"tokens": np.concatenate([r[1] for r in records]),
              "field": np.concatenate([r[2] for r in records]),
              "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
              "person": np.array([r[0] for r in records], np.int64)}
    counts = np.bincount(arrays["person"], minlength=n)
    # the metric reads the values as known once the name is: a value before it is guessed
    late = sum(int(np.argmax(r[2] == NAME) > np.argmax(r[2] >= VALUE)) for r in records)
    meta = {"format": FORMAT, "version": VERSION, "n": n, "seed": seed, "source": path.name,
            "source_sha256": hashlib.sha256(data).hexdigest(), "records": len(records),
            "people": n, "rewrites_per_person": {"min": int(counts.min()), "max": int(counts.max())},
            "tokens": int(lengths.sum()), "longest": int(lengths.max()), "name_not_first": late,
            "byte_tokens": int(np.count_nonzero((arrays["tokens"] >= len(SPECIALS))
                                                & (arrays["tokens"] < len(SPECIALS) + N_BYTES))),
            "digest": rewrites_digest(arrays)}
    _write(out, arrays, meta)
    return meta


def _write(out: Path, arrays: dict, meta: dict):
    """Write the import into a temporary sibling of ``out``, then rename it into place."""
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_out(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it owner-only
    old = tmp.with_suffix(".old")
    try:
        with atomic_path(tmp / ARRAYS) as f:
            with open(f, "wb") as handle:
                np.savez(handle, **arrays)
        write_json(tmp / META, meta)
        _fsync_dir(tmp)
        moved = out.is_dir() and any(out.iterdir())
        if moved:  # an earlier import: a folder can only be renamed onto an empty one
            os.rename(out, old)
        try:
            os.replace(tmp, out)  # onto nothing or an empty folder
        except BaseException:
            if moved:  # put the earlier import back
                os.rename(old, out)
            raise
        _fsync_dir(out.parent)
    finally:  # the temporary folder after a failure; the earlier import after a success
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def summary(meta: dict, out) -> str:
    """What an import holds, one example with its labels marked, and the config lines."""
    out = Path(out).absolute()
    ds = BioR.load(out, meta["n"], meta["seed"])  # reads back what was written
    r = ds.render([0], [0], labels=True)
    field, marked = r.labels.field, []
    cuts = (np.flatnonzero(np.diff(field)) + 1).tolist()  # runs of one label
    for lo, hi in zip([0] + cuts, cuts + [len(field)]):
        f, piece = int(field[lo]), ds.tokenizer.decode(r.tokens[lo:hi])
        if f == NAME or f >= VALUE:  # "[Carmen Jules Cisneros]{name}", the space outside
            word, label = piece.lstrip(), "name" if f == NAME else ds.attributes[f - VALUE].name
            piece = f"{piece[:len(piece) - len(word)]}[{word}]{{{label}}}"
        marked.append("" if f == SPECIAL else piece)
    example = "".join(marked)
    per = meta["rewrites_per_person"]
    lo_hi = f"{per['min']}" if per["min"] == per["max"] else f"{per['min']} to {per['max']}"
    lines = [f"imported {meta['records']:,} rewrites of {meta['people']:,} people of "
             f"bioS(n={meta['n']:,}, seed={meta['seed']}) from {meta['source']}",
             f"rewrites per person: {lo_hi}; tokens: {meta['tokens']:,} (EOS included), longest "
             f"rewrite {meta['longest']:,}; {meta['byte_tokens'] / meta['tokens']:.0%} are UTF-8 "
             "bytes of words outside kcap's vocabulary",
             f"written to {out} ({META}, {ARRAYS})"]
    if meta["name_not_first"]:
        lines.append(f"note: {meta['name_not_first']:,} rewrite(s) give a value before the full "
                     "name; the metric reads each person's first rewrite (exposure 0), so put a "
                     "name-first one first")
    lines += ["person 0, first rewrite, labels marked:",
              "  " + (example if len(example) <= 600 else example[:600] + " ..."),
              "train on it with these lines in the config:",
              "  [data]", '  kind = "bioR"', f"  n = {meta['n']}", f"  seed = {meta['seed']}",
              f"  bior = {json.dumps(str(out))}"]
    return "\n".join(lines)
