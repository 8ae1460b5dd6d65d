"""bioS: reference text vs fast render, labels, variants, profiles, used ids, input checks."""
import numpy as np
import pytest

from kcap.data.bios import _PRONOUNS, _SPLIT_RE, GENDER, BioS, BioSConfig
from kcap.data.labels import NAME, SPECIAL, TEXT, VALUE
from kcap.data.pools import N_FULL_NAMES, birth_date_text
from kcap.data.templates import ATTRIBUTES
from kcap.data.tokenizer import EOS_ID, USEFUL_ID

VARIANTS = ["online", "simple", "multi3", "permute", "multi4+permute", "fullname",
            "online+fullname"]
CASES = [(v, m) for v in VARIANTS for m in (False, True)]
PRONOUNS = ({"He", "His", "he", "his", "him"}, {"She", "Her", "she", "her"})
N = 60


def _split(r):
    ends = np.cumsum(r.lengths)
    return [slice(int(e - n), int(e)) for e, n in zip(ends, r.lengths)]


def _value_texts(ds, p):
    prof = {k: int(v[0]) for k, v in ds.profiles([p]).items()}
    pools = ds.pools
    return [birth_date_text(prof["birth_date"]), pools.birth_cities[prof["birth_city"]],
            pools.universities[prof["university"]], pools.majors[prof["major"]],
            pools.employers[prof["employer"]], pools.employer_cities[prof["employer"]]], prof


def _people(n=N, reps=3):
    persons = np.tile(np.arange(n), reps)
    return persons, np.repeat(np.arange(reps), n) * 5 + persons % 4


@pytest.mark.parametrize("variant,marker", CASES)
def test_render_equals_encoded_reference_text(variant, marker):
    ds = BioS(BioSConfig(N, seed=11, variant=variant, marker=marker))
    persons, exposures = _people()
    r = ds.render(persons, exposures)
    assert r.tokens.dtype == np.int32 and r.labels is None
    for s, p, e in zip(_split(r), persons, exposures):
        assert r.tokens[s].tolist() == ds.tokenizer.encode(ds.text(int(p), int(e)))
    assert (r.tokens[np.cumsum(r.lengths) - 1] == EOS_ID).all()
    starts = np.cumsum(r.lengths) - r.lengths
    assert ((r.tokens[starts] == USEFUL_ID) == marker).all()
    r2 = ds.render(persons, exposures, labels=True)
    np.testing.assert_array_equal(r2.tokens, r.tokens)
    np.testing.assert_array_equal(r2.lengths, r.lengths)
    np.testing.assert_array_equal(ds.lengths(persons, exposures), r.lengths)
    assert ds.max_length() >= r.lengths.max()


@pytest.mark.parametrize("variant,marker", CASES)
def test_labels(variant, marker):
    ds = BioS(BioSConfig(N, seed=2, variant=variant, marker=marker))
    fullname = "fullname" in variant
    tok = ds.tokenizer
    persons, exposures = _people(reps=2)
    r = ds.render(persons, exposures, labels=True)
    lab = r.labels
    assert len(lab) == len(r.tokens)
    np.testing.assert_array_equal(lab.person, np.repeat(persons, r.lengths))
    np.testing.assert_array_equal(lab.chunk, np.where(lab.field >= VALUE, 0, -1))
    special = np.isin(r.tokens, [EOS_ID, USEFUL_ID])
    np.testing.assert_array_equal(lab.field == SPECIAL, special)
    assert set(np.unique(lab.field)) <= {TEXT, NAME, SPECIAL} | {VALUE + a for a in range(7)}
    for s, p in zip(_split(r), persons):
        toks, field = r.tokens[s], lab.field[s]
        values, prof = _value_texts(ds, int(p))
        name = ds.pools.full_name(prof["name_id"])
        pos = np.flatnonzero(field == NAME)
        first_period = np.flatnonzero(toks == tok.piece_id("."))[0]
        assert pos.size == 3 and (np.diff(pos) == 1).all() and pos[-1] < first_period
        assert pos[0] == int(marker)
        assert tok.decode(toks[pos]) == name  # bare: the biography starts with it
        for a in range(len(ATTRIBUTES)):
            vpos = np.flatnonzero(field == VALUE + a)
            assert vpos.size and (np.diff(vpos) == 1).all()
            assert tok.decode(toks[vpos]) == " " + values[a]
        gpos = np.flatnonzero(field == VALUE + GENDER)
        if fullname:
            assert gpos.size == 0
            words = {tok.token_text(int(t)).strip() for t in toks}
            assert not words & (PRONOUNS[0] | PRONOUNS[1])
        else:
            assert gpos.size == 1
            assert tok.token_text(int(toks[gpos[0]])).strip() in PRONOUNS[prof["gender"]]
            # it is the first pronoun of the biography
            texts = [tok.token_text(int(t)).strip() for t in toks[:gpos[0]]]
            assert not set(texts) & (PRONOUNS[0] | PRONOUNS[1])


def test_fullname_repeats_name_and_others_name_once():
    full = BioS(BioSConfig(30, seed=4, variant="fullname"))
    plain = BioS(BioSConfig(30, seed=4, variant="simple"))
    for p in range(30):
        name = full.pools.full_name(int(full.profiles([p])["name_id"][0]))
        assert full.text(p, 0).count(name) >= 6
        assert plain.text(p, 0).count(name) == 1
        assert plain.text(p, 0).startswith(name)
    assert [a.name for a in full.attributes] == list(ATTRIBUTES)
    assert [a.name for a in plain.attributes] == list(ATTRIBUTES) + ["gender"]
    assert [a.counted for a in plain.attributes] == [True] * 5 + [False, True]


def _renders(ds, person, exposures):
    r = ds.render(np.full(len(exposures), person), np.asarray(exposures))
    return [tuple(r.tokens[s].tolist()) for s in _split(r)]


def test_online_renders_differ_simple_identical():
    online = BioS(BioSConfig(20, variant="online"))
    simple = BioS(BioSConfig(20, variant="simple"))
    perm = BioS(BioSConfig(20, variant="permute"))
    orders = set()
    for p in range(20):
        assert len(set(_renders(online, p, range(6)))) == 6
        assert len(set(_renders(simple, p, [0, 1, 2, 7, 1000]))) == 1
        assert len(set(_renders(perm, p, [0, 1, 2, 7, 1000]))) == 1
        orders.add(tuple(perm._choices(np.array([p]), np.array([0]))[0][0]))
    assert len(orders) > 5  # permute shuffles sentence order across people


@pytest.mark.parametrize("m,extra", [(3, ""), (4, "+permute"), (1, "")])
def test_multi_has_period_m(m, extra):
    ds = BioS(BioSConfig(20, seed=1, variant=f"multi{m}{extra}"))
    for p in range(20):
        r = _renders(ds, p, range(3 * m))
        assert len(set(r)) == m
        assert all(r[e] == r[e % m] for e in range(3 * m))


def test_profiles_deterministic_distinct_and_ranged():
    a = BioS(BioSConfig(2000, seed=7)).profiles(np.arange(2000))
    b = BioS(BioSConfig(2000, seed=7, variant="simple")).profiles(np.arange(2000))
    c = BioS(BioSConfig(2000, seed=8)).profiles(np.arange(2000))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert (a["name_id"] != c["name_id"]).mean() > 0.99
    assert len(np.unique(a["name_id"])) == 2000
    assert a["name_id"].min() >= 0 and a["name_id"].max() < N_FULL_NAMES
    for attr, card in (("birth_date", 67200), ("birth_city", 200), ("university", 300),
                       ("major", 100), ("employer", 263), ("gender", 2)):
        assert a[attr].min() >= 0 and a[attr].max() < card
        assert len(np.unique(a[attr])) > min(card, 2000) * 0.5
    np.testing.assert_array_equal(a["work_city"], a["employer"])


def test_prefix_and_person_offset():
    n = 300
    small, big = BioS(BioSConfig(n, seed=3)), BioS(BioSConfig(2 * n, seed=3))
    junk = BioS(BioSConfig(n, seed=3, person_offset=n))
    ps, pb, pj = small.profiles(np.arange(n)), big.profiles(np.arange(2 * n)), junk.profiles(
        np.arange(n))
    for k in ps:
        np.testing.assert_array_equal(ps[k], pb[k][:n])
        np.testing.assert_array_equal(pj[k], pb[k][n:])
    assert not set(ps["name_id"].tolist()) & set(pj["name_id"].tolist())
    assert small.text(5, 2) == big.text(5, 2)
    assert junk.text(5, 2) == big.text(n + 5, 2)


@pytest.mark.parametrize("variant,marker", [("online", False), ("fullname", True),
                                            ("multi3", True)])
def test_used_token_ids(variant, marker):
    ds = BioS(BioSConfig(50, seed=9, variant=variant, marker=marker))
    used = ds.used_token_ids()
    assert (np.diff(used) > 0).all() and used.min() >= 0 and used.max() < ds.tokenizer.vocab_size
    seen = ds.render(np.tile(np.arange(50), 10), np.repeat(np.arange(10), 50)).tokens
    assert np.isin(seen, used).all()
    assert (USEFUL_ID in used) == marker and EOS_ID in used
    # Name parts of people outside the set are not "used".
    firsts = set(ds.profiles(np.arange(50))["first"].tolist())
    unused = [i for i in range(400) if i not in firsts]
    bare = [ds.tokenizer.piece_id(ds.pools.first_names[i]) for i in unused]
    assert not np.isin(bare, used).any()
    assert len(used) < ds.tokenizer.vocab_size // 2


@pytest.mark.parametrize("variant", ["online", "fullname"])
def test_max_length_bounds_many_renders(variant):
    ds = BioS(BioSConfig(1000, seed=13, variant=variant, marker=True))
    lengths = ds.lengths(np.arange(1000), np.arange(1000) % 17)
    assert lengths.max() <= ds.max_length()
    assert lengths.min() > 20


@pytest.mark.parametrize("variant,marker", [("simple", False), ("fullname", True)])
def test_max_length_between_attainable_and_per_sentence_bound(variant, marker):
    ds = BioS(BioSConfig(5, variant=variant, marker=marker))
    tok, P, fullname = ds.tokenizer, ds.pools, "fullname" in variant
    pools = [[birth_date_text(0)], P.birth_cities, P.universities, P.majors, P.employers,
             P.employer_cities]
    longest = [max(pool, key=lambda v: len(tok.encode(" " + v))) for pool in pools]

    def size(a, template, first, g):  # tokens of one sentence with the longest value
        def fill(m):
            slot = m.group(0)[1:-1]
            if slot == "value":
                return longest[a]
            if (slot in ("subj", "poss") and first) or fullname:
                return P.full_name(0) + ("'s" if slot in ("poss", "his") else "")
            return _PRONOUNS[slot][g]
        text = _SPLIT_RE.sub(fill, template)
        return len(tok.encode(text if first else " " + text))

    best = [[max(size(a, t, f, g) for t in ds.templates[attr]) for f in (True, False)
             for g in (0, 1)] for a, attr in enumerate(ATTRIBUTES)]  # [a][2*form + g]
    extra = 1 + int(marker)
    attainable = max(best[0][g] + sum(best[a][2 + g] for a in range(1, 6)) for g in (0, 1))
    assert attainable + extra <= ds.max_length() <= sum(map(max, best)) + extra
    if fullname:  # names everywhere: the bound is attained
        assert ds.max_length() == attainable + extra


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(n=0), ValueError, "n"), (dict(n=N_FULL_NAMES + 1), ValueError, "n"),
    (dict(n=-5), ValueError, "n"), (dict(n=2.0), TypeError, "n"), (dict(n=True), TypeError, "n"),
    (dict(n=10, seed=-1), ValueError, "seed"),
    (dict(n=10, person_offset=-1), ValueError, "person_offset"),
    (dict(n=10, person_offset=N_FULL_NAMES - 9), ValueError, "person_offset"),
    (dict(n=10, variant="multi0"), ValueError, "variant"),
    (dict(n=10, variant="foo"), ValueError, "variant"),
    (dict(n=10, variant="online+simple"), ValueError, "variant"),
    (dict(n=10, variant="multi2+multi3"), ValueError, "variant"),
    (dict(n=10, variant="permute+permute"), ValueError, "variant"),
    (dict(n=10, variant=""), ValueError, "variant"),
])
def test_bad_config_raises_naming_parameter(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        BioS(BioSConfig(**kwargs))


def test_largest_legal_config_is_accepted():
    ds = BioS(BioSConfig(10, person_offset=N_FULL_NAMES - 10))
    assert len(np.unique(ds.profiles(np.arange(10))["name_id"])) == 10


@pytest.mark.parametrize("persons,exposures,exc,word", [
    ([10], 0, ValueError, "persons"), ([-1], 0, ValueError, "persons"),
    ([0.0, 1.0], 0, TypeError, "persons"), ([[0, 1]], 0, ValueError, "persons"),
    ([0, 1], [0, 1, 2], ValueError, "exposures"), ([0], -1, ValueError, "exposures")])
def test_bad_people_raise(persons, exposures, exc, word):
    ds = BioS(BioSConfig(10))
    with pytest.raises(exc, match=word):
        ds.render(persons, exposures)
    with pytest.raises(exc, match=word):
        ds.lengths(persons, exposures)
    with pytest.raises(exc, match=word):
        ds.profiles(persons) if word == "persons" else ds.render(persons, exposures, labels=True)


@pytest.mark.parametrize("person,exposure,exc", [(10, 0, ValueError), (-1, 0, ValueError),
                                                 (0, -1, ValueError), (0.5, 0, TypeError)])
def test_bad_text_arguments_raise(person, exposure, exc):
    with pytest.raises(exc):
        BioS(BioSConfig(10)).text(person, exposure)
