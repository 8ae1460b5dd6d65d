"""bioD: reference text vs fast render, chunk sets, labels, configuration checks."""
import numpy as np
import pytest

from kcap.data.biod import MAX_K, BioD, BioDConfig
from kcap.data.bios import BioS, BioSConfig
from kcap.data.labels import NAME, SPECIAL, TEXT, VALUE
from kcap.data.tokenizer import EOS_ID

CONFIGS = [
    BioDConfig(n=30, k=4, c=2, d=20, l=2, t=10, seed=1),
    BioDConfig(n=30, k=1, c=3, d=5, l=2, t=7),            # K = 1
    BioDConfig(n=30, k=3, c=1, d=8, l=3, t=4),            # C = 1
    BioDConfig(n=30, k=5, c=2, d=40, l=1, t=50),          # L = 1
    BioDConfig(n=30, k=2, c=2, d=9, l=2, t=3),            # D == T**L exactly
    BioDConfig(n=30, k=1, c=1, d=1, l=1, t=1),            # the smallest space
    BioDConfig(n=30, k=3, c=2, d=64, l=10, t=40000),      # T**L ~ 1e46: hashed draw
    BioDConfig(n=30, k=2, c=2, d=50, l=4, t=40000, seed=3),  # T**L ~ 2.6e18: permutation
]
IDS = [f"k{c.k}c{c.c}d{c.d}l{c.l}t{c.t}" for c in CONFIGS]


def _split(r):
    ends = np.cumsum(r.lengths)
    return [slice(int(e - n), int(e)) for e, n in zip(ends, r.lengths)]


@pytest.fixture(scope="module", params=CONFIGS, ids=IDS)
def ds(request):
    return BioD(request.param)


def test_render_equals_encoded_reference_text(ds):
    n = ds.n_people
    persons = np.concatenate([np.arange(n), np.arange(n)[::-1]])
    exposures = np.concatenate([np.zeros(n, int), np.arange(n) * 3 + 1])
    r = ds.render(persons, exposures)
    for s, p, e in zip(_split(r), persons, exposures):
        text = ds.text(int(p), int(e))
        assert r.tokens[s].tolist() == ds.tokenizer.encode(text)
        assert ds.tokenizer.decode(r.tokens[s]) == text
    assert (r.tokens[np.cumsum(r.lengths) - 1] == EOS_ID).all()
    np.testing.assert_array_equal(ds.lengths(persons, exposures), r.lengths)
    assert (r.lengths == ds.max_length()).all()  # all bioD biographies have one length
    r2 = ds.render(persons, exposures, labels=True)
    np.testing.assert_array_equal(r2.tokens, r.tokens)


def test_chunks_are_distinct_rows_in_alphabet(ds):
    c = ds.config
    assert ds.chunks.shape == (c.k, c.d, c.l)
    assert ds.chunks.min() >= 0 and ds.chunks.max() < c.t
    for a in range(c.k):
        assert len(np.unique(ds.chunks[a], axis=0)) == c.d
    if c.d == c.t ** c.l:  # the whole space: every chunk appears
        codes = (ds.chunks * c.t ** np.arange(c.l - 1, -1, -1)).sum(-1)
        for a in range(c.k):
            np.testing.assert_array_equal(np.sort(codes[a]), np.arange(c.d))
    np.testing.assert_array_equal(BioD(c).chunks, ds.chunks)  # deterministic
    if c.k > 1 and c.t ** c.l >= 10 * c.d:  # each attribute draws its own set
        for a in range(1, c.k):
            assert not np.array_equal(ds.chunks[a], ds.chunks[0])


def test_labels(ds):
    c, tok = ds.config, ds.tokenizer
    n = ds.n_people
    persons, exposures = np.arange(n), np.arange(n) % 4
    r = ds.render(persons, exposures, labels=True)
    lab = r.labels
    np.testing.assert_array_equal(lab.person, np.repeat(persons, r.lengths))
    np.testing.assert_array_equal(lab.field == SPECIAL, r.tokens == EOS_ID)
    assert set(np.unique(lab.field)) <= {TEXT, NAME, SPECIAL} | {VALUE + a for a in range(c.k)}
    np.testing.assert_array_equal(lab.chunk >= 0, lab.field >= VALUE)
    prof = ds.profiles(persons)
    period = tok.piece_id(".")
    for s, p in zip(_split(r), persons):
        toks, field, chunk = r.tokens[s], lab.field[s], lab.chunk[s]
        name_pos = np.flatnonzero(field == NAME)
        assert name_pos.tolist() == [0, 1, 2]
        assert name_pos[-1] < np.flatnonzero(toks == period)[0]  # first sentence only
        assert tok.decode(toks[name_pos]) == ds.pools.full_name(int(prof["name_id"][p]))
        for a in range(c.k):
            vpos = np.flatnonzero(field == VALUE + a)
            assert vpos.size == c.c * c.l
            np.testing.assert_array_equal(chunk[vpos], np.repeat(np.arange(c.c), c.l))
            expected = ds.chunks[a, prof["values"][p, a]]  # (C, L) symbols
            np.testing.assert_array_equal(toks[vpos] - tok.symbol_offset, expected.reshape(-1))
            assert tok.decode(toks[vpos]) == "".join(f"<{s}>" for s in expected.reshape(-1))
        # Later sentences repeat the name as TEXT.
        assert (toks[field == TEXT] == toks[1]).sum() == c.k - 1


def test_profiles_and_sentence_order(ds):
    c = ds.config
    prof = ds.profiles(np.arange(ds.n_people))
    assert prof["values"].shape == (ds.n_people, c.k, c.c)
    assert prof["values"].min() >= 0 and prof["values"].max() < c.d
    assert len(np.unique(prof["name_id"])) == ds.n_people
    assert [a.name for a in ds.attributes] == [f"ID {a + 1}" for a in range(c.k)]
    assert all(a.cardinality == c.d ** c.c for a in ds.attributes)
    order = ds._order(np.arange(ds.n_people), np.zeros(ds.n_people, int))
    np.testing.assert_array_equal(np.sort(order, 1), np.broadcast_to(np.arange(c.k), order.shape))


def test_used_token_ids(ds):
    n = ds.n_people
    used = ds.used_token_ids()
    assert (np.diff(used) > 0).all() and used.max() < ds.tokenizer.vocab_size
    seen = ds.render(np.tile(np.arange(n), 5), np.repeat(np.arange(5), n)).tokens
    assert np.isin(seen, used).all()


def test_order_fresh_per_exposure_and_values_fixed():
    ds = BioD(BioDConfig(n=10, k=6, c=2, d=30, l=2, t=20))
    for p in range(10):
        texts = {ds.text(p, e) for e in range(6)}
        assert len(texts) == 6  # 720 orders: fresh at every exposure
        sentences = {frozenset(t.replace("<|endoftext|>", "").split(". ")) for t in texts}
        assert len({frozenset(x.rstrip(".") for x in s) for s in sentences}) == 1


def test_names_shared_with_bios_pool_and_seed_changes_everything():
    a = BioD(BioDConfig(n=200, k=2, c=1, d=10, l=2, t=10, seed=0))
    b = BioD(BioDConfig(n=200, k=2, c=1, d=10, l=2, t=10, seed=1))
    assert a.n_names == BioS(BioSConfig(1)).n_names
    assert (a.profiles(np.arange(200))["name_id"] != b.profiles(np.arange(200))["name_id"]).all()
    assert not np.array_equal(a.chunks, b.chunks)


@pytest.mark.parametrize("kwargs,word", [
    (dict(d=10, l=2, t=3), "d"),          # D > T**L
    (dict(d=2, l=1, t=1), "d"),
    (dict(k=0), "k"), (dict(k=MAX_K + 1), "k"), (dict(k=100), "k"),
    (dict(t=0), "t"), (dict(l=0), "l"), (dict(c=0), "c"), (dict(d=0), "d"),
    (dict(n=0), "n"), (dict(seed=-1), "seed"),
])
def test_bad_config_raises(kwargs, word):
    cfg = dict(n=5, k=2, c=1, d=4, l=2, t=5) | kwargs
    with pytest.raises(ValueError, match=rf"\b{word}\b"):
        BioD(BioDConfig(**cfg))


def test_bad_types_and_people_raise():
    with pytest.raises(TypeError, match="k"):
        BioD(BioDConfig(n=5, k=2.0, c=1, d=4, l=2, t=5))
    ds = BioD(BioDConfig(n=5, k=2, c=1, d=4, l=2, t=5))
    with pytest.raises(ValueError, match="persons"):
        ds.render([5], 0)
    with pytest.raises(TypeError, match="persons"):
        ds.render([0.0], 0)
    with pytest.raises(ValueError, match="exposures"):
        ds.lengths([0], [-1])
