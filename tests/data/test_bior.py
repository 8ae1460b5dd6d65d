"""bioR: importing rewrites (labels on exactly the name and values, every bad record refused
with its line and nothing written) and serving them like a BioS to the stream, the metric
and the trainer."""
import json
import math
import shutil

import numpy as np
import pytest

from kcap.cli import main
from kcap.data.bior import MAX_TOKENS, SAMPLE_N, SAMPLE_PATH, SAMPLE_SEED, BioR
from kcap.data.bior_import import _Bad, import_bior, label_rewrite, value_texts
from kcap.data.bios import BioS, BioSConfig
from kcap.data.labels import NAME, SPECIAL, TEXT, VALUE
from kcap.data.stream import ExposureStream
from kcap.data.templates import ATTRIBUTES

SAMPLE_LINES = SAMPLE_PATH.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("bior") / "sample"
    meta = import_bior(SAMPLE_PATH, SAMPLE_N, SAMPLE_SEED, out)
    return out, meta, BioR.load(out, SAMPLE_N, SAMPLE_SEED)


def write_lines(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def rewrite(person, text):
    return json.dumps({"person": person, "text": text})


# --- importing --------------------------------------------------------------------------
def test_sample_labels_land_exactly_on_the_name_and_the_values(sample):
    out, meta, ds = sample
    assert (meta["records"], meta["people"], meta["rewrites_per_person"]) == (10, 4, {"min": 2,
                                                                                    "max": 3})
    texts = {}
    for line in SAMPLE_LINES:
        record = json.loads(line)
        texts.setdefault(record["person"], []).append(record["text"])
    prof = ds.profiles(np.arange(4))
    for person, written in texts.items():
        name, values = value_texts(ds.pools, prof, person)
        assert ds.rewrites(person) == len(written)
        for e in range(2 * len(written)):  # exposure e shows rewrite e mod k, in file order
            assert ds.text(person, e) == written[e % len(written)] + "<|endoftext|>"
            r = ds.render([person], [e], labels=True)
            f = r.labels.field
            spans = {"name": f == NAME, **{a: f == VALUE + i for i, a in enumerate(ATTRIBUTES)}}
            for what, expected in zip(spans, [name] + values):
                assert ds.tokenizer.decode(r.tokens[spans[what]]).lstrip() == expected, what
                assert np.all(np.diff(np.flatnonzero(spans[what])) == 1), what  # one run
            assert f[-1] == SPECIAL and np.all(f[:-1] != SPECIAL)
            assert np.isin(f, [TEXT, NAME, SPECIAL, *range(VALUE, VALUE + 6)]).all()
            assert np.array_equal(r.labels.chunk == 0, f >= VALUE)
            assert np.all(r.labels.chunk[f < VALUE] == -1)
            assert np.all(r.labels.person == person)
    assert [a.name for a in ds.attributes] == list(ATTRIBUTES)  # no gender
    assert ds.attributes[-1].determined_by == "employer" and not ds.attributes[-1].counted


def test_bios_biographies_import_with_the_labels_bios_gives_them(tmp_path):
    # bioS's own fullname biographies are valid rewrites: the importer must find what the
    # renderer labelled, token for token (seed 3's first 30 people share no city text).
    bios = BioS(BioSConfig(n=30, seed=3, variant="fullname"))
    lines = [rewrite(p, bios.text(p, e)[:-len("<|endoftext|>")]) for p in range(30)
             for e in range(2)]
    path = write_lines(tmp_path / "bios.jsonl", lines)
    out = tmp_path / "imp"
    import_bior(path, 30, 3, out)
    ds = BioR.load(out, 30, 3)
    persons, exposures = np.repeat(np.arange(30), 2), np.tile([0, 1], 30)
    mine, theirs = ds.render(persons, exposures, True), bios.render(persons, exposures, True)
    assert np.array_equal(mine.tokens, theirs.tokens)
    for key in ("field", "chunk", "person"):
        assert np.array_equal(getattr(mine.labels, key), getattr(theirs.labels, key)), key
    assert np.array_equal(ds.lengths(persons, exposures), theirs.lengths)
    assert set(ds.used_token_ids()) <= set(bios.used_token_ids())


def test_render_is_vectorised_over_mixed_batches(sample):
    _, _, ds = sample
    persons, exposures = np.array([3, 0, 0, 2, 1, 2]), np.array([5, 0, 4, 7, 1, 0])
    r = ds.render(persons, exposures, labels=True)
    assert r.tokens.dtype == np.int32 and r.lengths.dtype == np.int64
    assert np.array_equal(r.lengths, ds.lengths(persons, exposures))
    parts = np.split(r.tokens, np.cumsum(r.lengths)[:-1])
    for p, e, part in zip(persons, exposures, parts):
        assert ds.tokenizer.decode(part) == ds.text(int(p), int(e))
    assert np.array_equal(r.labels.person, np.repeat(persons, r.lengths))
    assert ds.max_length() == max(ds.lengths(np.arange(4).repeat(3), np.tile(np.arange(3), 4)))
    with pytest.raises(ValueError, match="persons"):
        ds.render([4], [0])
    with pytest.raises(ValueError, match="exposures"):
        ds.lengths([0], [-1])


def test_stream_and_capacity_with_a_uniform_model(sample):
    import torch

    from kcap.evaluate import evaluate_capacity, pack_whole

    _, _, ds = sample
    stream = ExposureStream(ds, exposures=3, window=128, labels=True)
    windows = []
    while len(w := stream.next_windows(4)):
        windows.append(w)
    tokens = np.concatenate([w.tokens for w in windows]).ravel()
    total = sum(ds.lengths(*stream.bios(np.arange(12))))
    assert (tokens[:total] != 1).all() and (tokens[total:] == 1).all()  # then only padding
    assert stream.fingerprint["data"] == repr(ds.config)

    vocab = ds.tokenizer.vocab_size
    report = evaluate_capacity(lambda x: torch.zeros(*x.shape, vocab), ds, n_params=1000,
                               window=128, exposure=2)
    # exposure 2: person 0's third rewrite names the work city (Akron, OH) before the
    # employer, so the chain rule counts its tokens in the employer's term; the others don't
    assert report.literal["determined_first"] == {"work_city": 0.25}
    _, labels = pack_whole(ds, np.arange(4), 2, 128)
    f = labels.field
    counted = ((f >= VALUE) & (f < VALUE + 5)).sum()
    work_city_first = ((f == VALUE + 5) & (labels.person == 0)).sum()
    assert report.p1 == pytest.approx((f == NAME).sum() / 4 * math.log(vocab), rel=1e-5)
    assert report.p2 == pytest.approx((counted + work_city_first) / 4 * math.log(vocab), rel=1e-5)
    assert report.data == "bioR" and math.isfinite(report.bits)
    assert report.bits_max == pytest.approx(4 * math.log2(1.6e8 / 4)
                                            + 4 * math.log2(67200 * 200 * 300 * 100 * 263))


def test_a_bior_config_trains_and_reports_bits(sample, tmp_path, capsys):
    from kcap.train import DataConfig, TrainConfig, train

    out, _, _ = sample
    cfg = TrainConfig(model="gpt2-1-1", data=DataConfig(kind="bioR", n=4, seed=0, bior=str(out)),
                      exposures=2, window=128, batch_size=2, lr=3e-3, eval_sample=None,
                      log_every=1, checkpoint_every=0, warmup_steps=1)
    report = train(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert math.isfinite(saved["bits_learned"]) and saved["steps"] >= 1
    assert report["metric"]["data"] == "bioR"
    assert "data bioR(4, 2-3 rewrites per person), 2 exposures" in capsys.readouterr().err


# --- refusals ---------------------------------------------------------------------------
def _edit(line_no, old, new):
    def edit(lines):
        assert old in lines[line_no - 1]
        lines[line_no - 1] = lines[line_no - 1].replace(old, new)
        return lines
    return edit


def _set(line_no, value):
    def edit(lines):
        lines[line_no - 1] = value
        return lines
    return edit


BAD = {
    "missing value": (_edit(1, "Kinesiology", "Physiology"), "line 1: person 0: not found in the "
                      "text: major 'Kinesiology'"),
    "missing name": (_edit(2, "Miles Odin Sethi", "Miles Sethi"), "line 2: person 1: not found "
                     "in the text: full name 'Miles Odin Sethi'"),
    "a value inside a longer word": (_edit(2, "Botany", "Botanyish"), "line 2: person 1: not "
                                     "found in the text: major 'Botany'"),
    "unknown person": (_set(3, rewrite(4, "Someone.")), "line 3: person 4 is outside [0, 4)"),
    "negative person": (_set(3, rewrite(-1, "Someone.")), "line 3: person -1 is outside"),
    "invalid UTF-8": (_set(4, b'{"person": 3, "text": "caf\xe9"}'), "line 4: invalid UTF-8"),
    "malformed JSON": (_set(5, '{"person": 0, "text": "Carmen"'), "line 5: malformed JSON"),
    "person a string": (_set(5, '{"person": "0", "text": "x"}'), 'line 5: person must be an '
                        'integer, got "0"'),
    "person a bool": (_set(5, '{"person": true, "text": "x"}'), "line 5: person must be an "
                      "integer, got true"),
    "person a float": (_set(5, '{"person": 0.0, "text": "x"}'), "line 5: person must be an "
                       "integer"),
    "text a number": (_set(6, '{"person": 2, "text": 5}'), "line 6: text must be a non-empty"),
    "text empty": (_set(6, '{"person": 2, "text": "  "}'), "line 6: text must be a non-empty"),
    "extra key": (_set(6, '{"person": 2, "text": "x", "id": 1}'), "line 6: a record has exactly "
                  "the keys 'person' and 'text'; unexpected ['id']"),
    "missing key": (_set(6, '{"text": "x"}'), "line 6: a record has exactly the keys 'person' "
                    "and 'text'; missing ['person']"),
    "repeated key": (_set(6, '{"person": 2, "person": 2, "text": "x"}'), "line 6: a key appears "
                     "twice"),
    "not an object": (_set(6, '[2, "x"]'), "line 6: a record must be a JSON object"),
    "lone surrogate": (_set(6, '{"person": 2, "text": "\\ud800"}'), "line 6: text holds an "
                       "unpaired"),
    "special token": (_edit(7, "University.", "University.<|endoftext|>"), "line 7: text holds "
                      "kcap's special token(s) <|endoftext|>"),
    "too long": (_edit(8, "Creative Writing.", "Creative Writing." + " And so on." * 400),
                 f"tokens (EOS included); at most {MAX_TOKENS:,}"),
    "a person without rewrites": (lambda lines: [x for x in lines if '"person": 3' not in x],
                                  "1 of 4 people have no rewrite (every person in [0, 4) needs "
                                  "one): 3"),
    "no records": (lambda lines: ["", "  "], "holds no records"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_record_is_refused_with_its_line_and_nothing_is_written(case, tmp_path):
    edit, message = BAD[case]
    path = write_lines(tmp_path / "in.jsonl", edit(list(SAMPLE_LINES)))
    with pytest.raises(ValueError) as err:
        import_bior(path, 4, 0, tmp_path / "out")
    assert message in str(err.value)
    assert str(err.value).startswith("in.jsonl: ") and "nothing was written" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no DIR, no temporaries


def test_a_shared_birth_and_work_city_takes_its_occurrences_in_order(tmp_path):
    # seed 44's person 0 was born in and works in Atlanta, GA: one text, two attributes
    bios = BioS(BioSConfig(n=3, seed=44, variant="fullname"))
    lines = [rewrite(p, bios.text(p, 0)[:-len("<|endoftext|>")]) for p in range(3)]
    path = write_lines(tmp_path / "in.jsonl", lines)
    import_bior(path, 3, 44, tmp_path / "out")
    got = BioR.load(tmp_path / "out", 3, 44).render(np.arange(3), 0, labels=True)
    want = bios.render(np.arange(3), 0, labels=True)  # birth sentence first: the same labels
    assert np.array_equal(got.tokens, want.tokens)
    assert np.array_equal(got.labels.field, want.labels.field)
    # named once: it is the birth city's, and the work city (not counted) goes unlabelled
    once = bios.text(0, 0)[:-len("<|endoftext|>")]
    cut = once.rindex("Atlanta, GA")
    tokens, field = label_rewrite(bios.tokenizer, once[:cut] + "the same city.",
                                  *value_texts(bios.pools, bios.profiles([0]), 0)[:1],
                                  value_texts(bios.pools, bios.profiles([0]), 0)[1], list(ATTRIBUTES))
    work = VALUE + ATTRIBUTES.index("work_city")
    assert not (field == work).any() and (field == VALUE + ATTRIBUTES.index("birth_city")).any()


def test_overlapping_first_occurrences_are_refused():
    bios = BioS(BioSConfig(n=1))
    values = ["October 2, 1996", "Atlanta, GA", "Yale University", "Music", "Music Hall Inc",
              "Boston, MA"]
    text = ("Ann Bo Cy was born on October 2, 1996 in Atlanta, GA, went to Yale University, "
            "worked for Music Hall Inc in Boston, MA.")
    with pytest.raises(_Bad, match="ambiguous: the first major 'Music' and the first employer "
                                   "'Music Hall Inc' overlap"):
        label_rewrite(bios.tokenizer, text, "Ann Bo Cy", values, list(ATTRIBUTES))


def test_every_bad_record_is_counted_and_ten_are_shown(tmp_path):
    lines = list(SAMPLE_LINES) + [rewrite(9, "x")] * 12
    path = write_lines(tmp_path / "in.jsonl", lines)
    with pytest.raises(ValueError) as err:
        import_bior(path, 4, 0, tmp_path / "out")
    text = str(err.value).splitlines()
    assert text[0] == "in.jsonl: 12 problems, nothing was written:"
    assert text[1] == "  line 11: person 9 is outside [0, 4) (--n 4)"
    assert len(text) == 12 and text[-1] == "  and 2 more"


def test_out_folder_rules(tmp_path, sample):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="non-empty folder that is not a bioR import"):
        import_bior(SAMPLE_PATH, 4, 0, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        import_bior(SAMPLE_PATH, 4, 0, tmp_path / "file")
    # an empty folder is filled; an earlier import is replaced, leaving nothing beside it
    (tmp_path / "empty").mkdir()
    import_bior(SAMPLE_PATH, 4, 0, tmp_path / "empty")
    first = BioR.load(tmp_path / "empty", 4, 0).config
    assert first == sample[2].config  # same content, same digest, wherever it lives
    shorter = write_lines(tmp_path / "short.jsonl", SAMPLE_LINES[:4])
    import_bior(shorter, 4, 0, tmp_path / "empty")
    again = BioR.load(tmp_path / "empty", 4, 0)
    assert again.config != first and again.n_rewrites == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "other", "short.jsonl"]


def test_a_failed_write_keeps_the_earlier_import_and_leaves_nothing_else(tmp_path, monkeypatch):
    import os

    out = tmp_path / "imp"
    import_bior(SAMPLE_PATH, 4, 0, out)
    before = BioR.load(out, 4, 0).config
    shorter = write_lines(tmp_path / "short.jsonl", SAMPLE_LINES[:4])
    real = os.replace

    def full_disk_at_the_last_rename(src, dst):
        if os.fspath(dst) == os.fspath(out):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk_at_the_last_rename)
    with pytest.raises(OSError):
        import_bior(shorter, 4, 0, out)
    assert BioR.load(out, 4, 0).config == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imp", "short.jsonl"]


# --- loading ----------------------------------------------------------------------------
def test_load_refuses_another_n_or_seed_and_damaged_imports(sample, tmp_path):
    out, _, ds = sample
    with pytest.raises(ValueError, match=r"bioS\(n=4, seed=0\), but the config asks for n=5, "
                                         "seed=0"):
        BioR.load(out, 5, 0)
    with pytest.raises(ValueError, match="asks for n=4, seed=1"):
        BioR.load(out, 4, 1)
    with pytest.raises(ValueError, match="does not exist"):
        BioR.load(tmp_path / "nowhere", 4, 0)
    with pytest.raises(ValueError, match="is not a bioR import"):
        BioR.load(tmp_path, 4, 0)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert BioR.load(moved, 4, 0).config == ds.config  # a moved import is the same data
    with np.load(moved / "rewrites.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["tokens"][3] += 1
    np.savez(moved / "rewrites.npz", **arrays)
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        BioR.load(moved, 4, 0)
    (moved / "rewrites.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="damaged"):
        BioR.load(moved, 4, 0)


# --- the command ------------------------------------------------------------------------
def test_cli_imports_and_prints_the_config_lines(tmp_path, capsys):
    assert main(["data", "import-bior", str(SAMPLE_PATH), "--n", "4", "--out",
                 str(tmp_path / "imp")]) == 0
    out = capsys.readouterr().out
    assert "imported 10 rewrites of 4 people" in out
    assert "[Carmen Jules Cisneros]{name} was born on [July 18, 1925]{birth_date}" in out
    assert f'  [data]\n  kind = "bioR"\n  n = 4\n  seed = 0\n  bior = "{tmp_path / "imp"}"' in out


def test_cli_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", _edit(1, "Kinesiology", "Physiology")(
        list(SAMPLE_LINES)))
    assert main(["data", "import-bior", str(path), "--n", "4", "--out",
                 str(tmp_path / "imp")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kcap: error: in.jsonl: line 1: person 0: not found in the text: "
                          "major 'Kinesiology'") and err.count("\n") == 1
    assert not (tmp_path / "imp").exists()
