"""kcap's two readings of Definition 4.3 on bioS (kcap/capacity.py), held by two models built
from the data's own text and labels, without training:

- an oracle that knows every person (1/N over the N names, every value certain) and each
  person's gender, but not which pronoun form the next template will write: R = R_max;
- a pool guesser that knows the pools, the templates' pronoun forms and the employer-to-city
  map, but nothing about any person: 0 value bits.

Read literally (``report.literal``), the oracle falls ~0.66 bits per person short (the
pronoun's form is charged to the gender) and the guesser is credited ~+2.5 value bits per
person on online and permute data (the work city, uncounted, gives the employer away).
"""
import functools
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from kcap.data.bios import BioS, BioSConfig
from kcap.data.labels import NAME, VALUE
from kcap.data.pools import N_BIRTH_DATES, birth_date_text, load_pools
from kcap.evaluate import evaluate_capacity, pack_whole

WINDOW, N = 256, 150
# Each scored token's log-probability goes through the evaluator's float32 log-softmax:
# ~1e-7 relative per token, so a person's ~20 scored tokens are exact to ~1e-5 nats.
PER_PERSON_NATS = 1e-5
VARIANTS = ["online", "permute", "simple", "fullname"]


class Trie:
    """Weighted token sequences: the distribution of the next token given a prefix."""

    def __init__(self, sequences, weights=None):
        self.children = defaultdict(Counter)
        self.with_prefix, self.exact = Counter(), Counter()
        for seq, w in zip(sequences, weights or [1] * len(sequences)):
            seq = tuple(seq)
            self.exact[seq] += w
            for j in range(len(seq) + 1):
                self.with_prefix[seq[:j]] += w
            for j in range(len(seq)):
                self.children[seq[:j]][seq[j]] += w

    def next(self, prefix) -> dict:
        counts = self.children[tuple(prefix)]
        assert counts, f"prefix {prefix} is in no sequence"
        total = sum(counts.values())
        return {t: c / total for t, c in counts.items()}

    def credit_bits(self, seq) -> float:
        """Bits a token-by-token guess earns on ``seq`` beyond its true probability: the
        metric sums a value's tokens only, so where ``seq`` is a proper prefix of other
        sequences ("Music" of "Music Composition") the end of the value goes unscored."""
        return math.log2(self.with_prefix[tuple(seq)] / self.exact[tuple(seq)])


def table_model(tokens: np.ndarray, belief: dict, vocab: int):
    """A model that at (window w, position t) predicts the next token with the distribution
    ``belief[w, t]`` ({token: probability}) and is certain of the true next token elsewhere."""
    lookup = {row.tobytes(): i for i, row in enumerate(tokens)}

    def model(x: torch.Tensor) -> torch.Tensor:
        out = torch.full((*x.shape, vocab), -1e30, dtype=torch.float64)
        for b, row in enumerate(x.numpy()):
            w = lookup[row.tobytes()]
            out[b, torch.arange(x.shape[1] - 1), torch.from_numpy(row[1:])] = 0.0
            for t in range(x.shape[1] - 1):
                if (w, t) in belief:
                    out[b, t] = -1e30
                    for token, p in belief[w, t].items():
                        out[b, t, token] = math.log(p)
        return out
    return model


def runs(labels, w):
    """(field, person, start, end) of each run of equal labels in window ``w``."""
    f, p = labels.field[w], labels.person[w]
    cut = np.flatnonzero((f[1:] != f[:-1]) | (p[1:] != p[:-1])) + 1
    bounds = np.r_[0, cut, len(f)]
    for s, e in zip(bounds[:-1], bounds[1:]):
        yield int(f[s]), int(p[s]), int(s), int(e)


def setup(variant):
    ds = BioS(BioSConfig(n=N, seed=5, variant=variant))
    tokens, labels = pack_whole(ds, np.arange(N), 0, WINDOW)
    names = {}
    for w in range(len(tokens)):
        for f, p, s, e in runs(labels, w):
            if f == NAME:
                names[p] = tuple(tokens[w, s:e])
    assert len(names) == N
    return ds, tokens, labels, Trie(list(names.values()))


def sentence_start(ds, tokens, w, t) -> bool:
    """Whether token (w, t) starts a sentence: what the text so far says of the next form
    (" He" / " His" start a sentence; " he", " his", " him" sit inside one)."""
    return int(tokens[w, t - 1]) in ds.tokenizer.encode_known(".")


def pronoun_forms(ds, tokens, labels) -> dict[tuple[int, bool], dict[int, float]]:
    """(gender, sentence start) -> distribution of the first pronoun's token over the
    renderings (the templates' choice of form), counted from the data's own text."""
    gender = ds.profiles(np.arange(N))["gender"]
    g_field = VALUE + [a.name for a in ds.attributes].index("gender")
    counts = defaultdict(Counter)
    for w in range(len(tokens)):
        for t in np.flatnonzero(labels.field[w] == g_field):
            key = int(gender[labels.person[w, t]]), sentence_start(ds, tokens, w, t)
            counts[key][int(tokens[w, t])] += 1
    assert len(counts) == 4, "each gender in both contexts"
    return {k: {tok: c / sum(cs.values()) for tok, c in cs.items()} for k, cs in counts.items()}


def spread(belief, w, s, e, tokens, trie, prefix=()):
    """Put the trie's next-token distributions on the tokens s..e-1 of window w."""
    seq = tuple(tokens[w, s:e])
    for j in range(e - s):
        belief[w, s + j - 1] = trie.next(prefix + seq[:j])
    return seq


def oracle(ds, tokens, labels, names):
    forms = pronoun_forms(ds, tokens, labels) if "gender" in [a.name for a in ds.attributes] else {}
    gender = ds.profiles(np.arange(N))["gender"]
    belief, form_bits = {}, 0.0
    for w in range(len(tokens)):
        for f, p, s, e in runs(labels, w):
            if f == NAME:
                spread(belief, w, s, e, tokens, names)
            elif f >= VALUE and ds.attributes[f - VALUE].name == "gender":
                # knows the gender and the text so far, not the template to come
                belief[w, s - 1] = forms[int(gender[p]), sentence_start(ds, tokens, w, s)]
                form_bits -= math.log2(belief[w, s - 1][int(tokens[w, s])])
    return belief, form_bits


@functools.lru_cache(maxsize=1)
def pool_tries():
    """Tries of every pool, as the guesser knows them (built once: 67,200 birth dates)."""
    ds, pools = BioS(BioSConfig(n=1)), load_pools()
    enc = lambda text: ds.tokenizer.encode_known(" " + text)  # noqa: E731  values own their space
    cities = [tuple(enc(c)) for c in pools.employer_cities]
    by_city = defaultdict(list)
    for employer, city in zip(pools.employers, cities):
        by_city[city].append(enc(employer))
    return {"birth_date": Trie([enc(birth_date_text(i)) for i in range(N_BIRTH_DATES)]),
            "birth_city": Trie([enc(c) for c in pools.birth_cities]),
            "university": Trie([enc(u) for u in pools.universities]),
            "major": Trie([enc(m) for m in pools.majors]),
            "employer": Trie([enc(e) for e in pools.employers]),
            "work_city": Trie(cities),  # each city weighted by its number of employers
            "employer_given_city": {c: Trie(es) for c, es in by_city.items()}}


def pool_guesser(ds, tokens, labels, names, tries):
    """Beliefs of the guesser, and the bits the metric is expected to credit it with (the
    unscored ends of values that are prefixes of others: see Trie.credit_bits)."""
    forms = pronoun_forms(ds, tokens, labels) if "gender" in [a.name for a in ds.attributes] else {}
    either = defaultdict(Counter)  # sentence start -> pronoun distribution
    for (g, start), dist in forms.items():
        for tok, q in dist.items():
            either[start][tok] += q / 2  # the genders are equally likely
    belief, credit = {}, 0.0
    for w in range(len(tokens)):
        seen = defaultdict(dict)  # person -> attribute -> its value's tokens, in text order
        for f, p, s, e in runs(labels, w):
            if f == NAME:
                spread(belief, w, s, e, tokens, names)
            if f < VALUE:
                continue
            attr = ds.attributes[f - VALUE].name
            if attr == "gender":
                belief[w, s - 1] = dict(either[sentence_start(ds, tokens, w, s)])
                continue
            if attr == "work_city" and "employer" in seen[p]:
                continue  # the map gives the city: certain
            trie = tries[attr]
            if attr == "employer" and "work_city" in seen[p]:
                trie = tries["employer_given_city"][seen[p]["work_city"]]
            seen[p][attr] = spread(belief, w, s, e, tokens, trie)
            credit += trie.credit_bits(seen[p][attr])
    return belief, credit


@pytest.mark.parametrize("variant", VARIANTS)
def test_oracle_that_cannot_know_the_pronoun_form_reaches_r_max(variant):
    ds, tokens, labels, names = setup(variant)
    belief, form_bits = oracle(ds, tokens, labels, names)
    model = table_model(tokens, belief, ds.tokenizer.vocab_size)
    report = evaluate_capacity(model, ds, n_params=10_000, window=WINDOW)
    assert report.p1 == pytest.approx(math.log(N), abs=1e-6)
    assert report.p2 == pytest.approx(0.0, abs=PER_PERSON_NATS)
    assert report.R == pytest.approx(report.R_max, rel=1e-5)  # the issue asked for 0.1%
    # Read literally, the gender is charged the pronoun form's surprise: here ~0.9 bits per
    # person (this oracle sees only whether a sentence starts; the issue measured 0.66 for
    # one that reads the whole template so far). No pronoun in fullname: readings agree.
    lost = report.bits - report.literal["bits"]
    assert lost == pytest.approx(form_bits, abs=N * PER_PERSON_NATS / math.log(2))
    assert (form_bits > 0.3 * N) == (variant != "fullname")


@pytest.mark.parametrize("variant", VARIANTS)
def test_pool_guesser_learns_no_value_bits(variant):
    ds, tokens, labels, names = setup(variant)
    belief, credit = pool_guesser(ds, tokens, labels, names, pool_tries())
    report = evaluate_capacity(table_model(tokens, belief, ds.tokenizer.vocab_size), ds,
                               n_params=10_000, window=WINDOW)
    # 0 bits, but for the few values that are token prefixes of another ("Music" and
    # "Music Composition"): the metric cannot see a value's end. Known exactly here.
    assert abs(credit) / N < 0.1
    assert report.value_bits == pytest.approx(credit, abs=N * PER_PERSON_NATS / math.log(2))
    literal = report.literal
    if variant in ("online", "permute"):  # half the work cities come first: ~+3.2 - 0.66
        assert 0.3 < literal["determined_first"]["work_city"] < 0.7
        assert 1.5 < (literal["value_bits"] - report.value_bits) / N < 3.5
    else:
        assert literal["determined_first"]["work_city"] == 0.0


def test_gender_is_scored_over_the_pronouns_of_each_gender():
    """The gender's loss is -ln P(pronouns of the observed gender) / P(all pronouns): a model
    splitting its mass between "He" and "His" (male) loses nothing; one unsure of the gender
    loses its doubt, whatever other tokens it also predicts."""
    ds, tokens, labels, _ = setup("online")
    gender = ds.profiles(np.arange(N))["gender"]
    g_field = VALUE + [a.name for a in ds.attributes].index("gender")
    male, female = ds.attributes[-1].classes
    belief = {}
    for w in range(len(tokens)):
        for t in np.flatnonzero(labels.field[w] == g_field):
            mine, other = (male, female) if gender[labels.person[w, t]] == 0 else (female, male)
            # 0.5 on the other tokens of the text, 0.4 over this gender's pronouns, 0.1 other's
            dist = {int(tokens[w, t - 1]): 0.5}
            for tok in mine:
                dist[tok] = dist.get(tok, 0) + 0.4 / len(mine)
            for tok in other:
                dist[tok] = dist.get(tok, 0) + 0.1 / len(other)
            belief[w, t - 1] = dist
    report = evaluate_capacity(table_model(tokens, belief, ds.tokenizer.vocab_size), ds,
                               n_params=10_000, window=WINDOW)
    assert report.attribute_loss["gender"] == pytest.approx(-math.log(0.8), rel=1e-5)
