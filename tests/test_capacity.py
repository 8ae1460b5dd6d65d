"""The metric, pinned: oracles, uniform guessers, hand-computed bioD cases, token-split
invariance, parameter counting and the sampling interval."""
import math

import numpy as np
import pytest
import torch

from kcap.capacity import (PersonLosses, biod_bits, biod_bits_max, bios_bits_max,
                           capacity_report, count_params, data_bits_max, log2_s0)
from kcap.data.biod import BioD, BioDConfig
from kcap.data.bios import BioS, BioSConfig
from kcap.data.labels import NAME, VALUE
from kcap.data.pools import N_FULL_NAMES
from kcap.evaluate import evaluate_capacity, pack_whole

WINDOW = 256
# The evaluator's log-softmax runs in float32 (as it will on a GPU): each token's loss carries
# a rounding error of ~1e-7 relative, so sums of a few tokens are exact to ~1e-6.
FP32 = 1e-6


def target_model(tokens: np.ndarray, target_logp: np.ndarray, vocab: int):
    """A 'model' whose probability of the true next token at (window, t) is exp(target_logp).

    The rest of the mass goes to one other token, so every row is a distribution.
    """
    lookup = {row.tobytes(): i for i, row in enumerate(tokens)}

    def model(x: torch.Tensor) -> torch.Tensor:
        out = torch.full((*x.shape, vocab), -1e30, dtype=torch.float64)
        for b, row in enumerate(x.numpy()):
            lp = target_logp[lookup[row.tobytes()]]
            for t in range(x.shape[1] - 1):
                true = int(row[t + 1])
                out[b, t, true] = lp[t]
                rest = -math.expm1(lp[t]) if lp[t] < 0 else 0.0
                if rest > 0:
                    out[b, t, (true + 1) % vocab] = math.log(rest)
        return out
    return model


def name_logp(dataset, tokens, labels):
    """Log-probs of name tokens under the true distribution of the N names (a trie)."""
    prof = dataset.profiles(np.arange(dataset.n_people))
    parts = np.stack([prof["first"], prof["middle"], prof["last"]], 1)
    lp = np.zeros(tokens.shape)
    for w in range(len(tokens)):
        pos = np.flatnonzero(labels.field[w] == NAME)
        for start in pos[::3]:
            person = labels.person[w, start]
            mine = parts[person]
            match = np.ones(len(parts), bool)
            for j in range(3):
                before = match.sum()
                match &= parts[:, j] == mine[j]
                lp[w, start + j - 1] = math.log(match.sum() / before)  # predicted at t-1
    return lp


def bios_setup(n=60, variant="online"):
    ds = BioS(BioSConfig(n=n, seed=3, variant=variant))
    tokens, labels = pack_whole(ds, np.arange(n), 0, WINDOW)
    return ds, tokens, labels


def test_bios_oracle_reaches_r_max():
    ds, tokens, labels = bios_setup()
    lp = name_logp(ds, tokens, labels)  # everything else certain
    model = target_model(tokens, lp, ds.tokenizer.vocab_size)
    report = evaluate_capacity(model, ds, n_params=1000, window=WINDOW)
    assert report.p1 == pytest.approx(math.log(ds.n_people), abs=FP32)
    assert report.p2 == pytest.approx(0.0, abs=FP32)
    assert report.R == pytest.approx(report.R_max, rel=FP32)
    assert report.bits_max == pytest.approx(bios_bits_max(60, N_FULL_NAMES, log2_s0(ds)))


@pytest.mark.parametrize("variant", ["online", "fullname"])
def test_s0_counts_the_gender_only_where_a_pronoun_expresses_it(variant):
    ds = BioS(BioSConfig(n=10, variant=variant))
    expected_s0 = 67200 * 200 * 300 * 100 * 263 * (2 if variant == "online" else 1)
    assert log2_s0(ds) == pytest.approx(math.log2(expected_s0))


def test_uniform_over_pools_gives_zero_value_bits():
    # fullname, whose sentences keep their order: no pronoun and the employer always precedes
    # the work city. The readings that matter elsewhere: tests/test_capacity_readings.py.
    ds, tokens, labels = bios_setup(variant="fullname")
    lp = name_logp(ds, tokens, labels)
    cards = {VALUE + i: a.cardinality for i, a in enumerate(ds.attributes)}
    for w in range(len(tokens)):
        vals = np.flatnonzero(labels.field[w] >= VALUE)
        firsts = vals[np.r_[True, np.diff(vals) > 1]]  # first token of each value
        for t in firsts:
            card = cards[labels.field[w, t]]
            lp[w, t - 1] = -math.log(card)
    report = evaluate_capacity(target_model(tokens, lp, ds.tokenizer.vocab_size), ds, 10_000,
                               window=WINDOW)
    assert report.value_bits == pytest.approx(0.0, abs=60 * 7 * FP32 / math.log(2))
    assert report.name_bits == pytest.approx(60 * math.log2(N_FULL_NAMES / 60), rel=FP32)


def test_bits_do_not_depend_on_how_a_value_is_split_into_tokens():
    ds, tokens, labels = bios_setup(n=30)
    rng = np.random.default_rng(0)
    lp_last, lp_spread = np.zeros(tokens.shape), np.zeros(tokens.shape)
    for w in range(len(tokens)):
        vals = np.flatnonzero(labels.field[w] >= VALUE)
        runs = np.split(vals, np.flatnonzero(np.diff(vals) > 1) + 1)
        for run in runs:
            total = -rng.uniform(0.5, 3.0)
            lp_last[w, run[-1] - 1] = total  # all the loss on the last token
            lp_spread[w, run - 1] = total / len(run)  # spread evenly
    r1 = evaluate_capacity(target_model(tokens, lp_last, ds.tokenizer.vocab_size), ds, 500,
                           window=WINDOW)
    r2 = evaluate_capacity(target_model(tokens, lp_spread, ds.tokenizer.vocab_size), ds, 500,
                           window=WINDOW)
    assert r1.value_bits == pytest.approx(r2.value_bits, rel=FP32)
    assert r1.p2 > 0


def test_biod_formula_by_hand():
    # N=4, N0=1.6e8, K=2, C=1, D=3, L=1, T=5.
    name, value, div = biod_bits(4, 1.6e8, 2, 1, 3, 1, 5, p1=math.log(4), p2=0.0, p3=0.0)
    assert name == pytest.approx(4 * math.log2(1.6e8 / 4))
    assert value == pytest.approx(4 * 2 * math.log2(3))
    assert div == pytest.approx(2 * 3 * math.log2(5 / 3))
    assert biod_bits_max(4, 1.6e8, 2, 1, 3, 1, 5) == pytest.approx(
        4 * math.log2(4e7) + 8 * math.log2(3) + 6 * math.log2(5 / 3))
    # Guessing uniformly over D_a for a value (p2 = C ln D) gives no value bits; guessing
    # uniformly over T^L for a first chunk (p3 = L ln T) gives K D log2(1 / D) diversity bits.
    _, value, div = biod_bits(4, 1.6e8, 2, 1, 3, 1, 5, math.log(4), math.log(3), math.log(5))
    assert value == pytest.approx(0.0, abs=1e-12)
    assert div == pytest.approx(-2 * 3 * math.log2(3))


def test_biod_oracle_reaches_r_max():
    ds = BioD(BioDConfig(n=20, k=3, c=2, d=4, l=2, t=7, seed=1))
    tokens, labels = pack_whole(ds, np.arange(20), 0, WINDOW)
    lp = name_logp(ds, tokens, labels)
    # First chunks "known" only up to the D chunks: first-chunk loss ln(1/ ... ) is 0 here,
    # so p3 = 0 and the diversity term is K D log2(T^L / D): exactly R_max's.
    report = evaluate_capacity(target_model(tokens, lp, ds.tokenizer.vocab_size), ds, 300,
                               window=WINDOW)
    assert report.p3 == pytest.approx(0.0, abs=FP32)
    assert report.R == pytest.approx(report.R_max, rel=FP32)
    assert report.bits_max == pytest.approx(data_bits_max(ds))


def test_count_params_excludes_unused_rows_and_counts_tied_once():
    vocab, d = 50, 8
    used = [0, 3, 7, 9]

    class Tiny(torch.nn.Module):
        def __init__(self, tied):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, d)
            self.mid = torch.nn.Linear(d, d)
            self.head = torch.nn.Linear(d, vocab, bias=False)
            if tied:
                self.head.weight = self.emb.weight

    middle = d * d + d
    assert count_params(Tiny(True), used, vocab) == len(used) * d + middle
    assert count_params(Tiny(False), used, vocab) == 2 * len(used) * d + middle
    with pytest.raises(ValueError, match="used_token_ids"):
        count_params(Tiny(True), [vocab], vocab)


def test_sampling_interval_covers_the_population_value():
    ds = BioS(BioSConfig(n=2000, seed=0))
    rng = np.random.default_rng(1)
    a = len(ds.attributes)
    order = rng.permuted(np.tile(np.arange(a), (2000, 1)), axis=1)  # each person's sentences
    full = PersonLosses(np.arange(2000), rng.gamma(2.0, 2.0, 2000), rng.gamma(1.0, 3.0, (2000, a)),
                        np.zeros((2000, a)), position=order)
    truth = capacity_report(ds, full, 10_000)
    assert truth.bits_ci95 == 0.0
    hits, trials = 0, 300
    for _ in range(trials):
        idx = np.sort(rng.choice(2000, 200, replace=False))
        part = PersonLosses(idx, full.name[idx], full.value[idx], full.first_chunk[idx],
                            position=order[idx])
        r = capacity_report(ds, part, 10_000)
        assert r.bits_ci95 > 0
        hits += abs(r.bits - truth.bits) <= r.bits_ci95
    # Nominal 95%; with 300 trials a correct interval lands in [0.91, 0.99] with >99% chance.
    assert 0.91 <= hits / trials <= 0.99


def test_report_rejects_bad_input():
    ds = BioS(BioSConfig(n=10))
    losses = PersonLosses(np.arange(10), np.zeros(10), np.zeros((10, 7)), np.zeros((10, 7)))
    with pytest.raises(ValueError, match="n_params"):
        capacity_report(ds, losses, 0)
    with pytest.raises(ValueError, match="position is needed: work_city"):
        capacity_report(ds, losses, 10)  # which of work city and employer came first?


def test_chain_rule_counts_the_work_city_only_where_it_precedes_the_employer():
    ds = BioS(BioSConfig(n=4))
    names = [a.name for a in ds.attributes]
    city, employer = names.index("work_city"), names.index("employer")
    value = np.zeros((4, 7))
    value[:, city] = [1.0, 2.0, 3.0, 4.0]
    position = np.tile(np.arange(7), (4, 1)) + 10
    position[[1, 3], city] = [0, 3]  # persons 1 and 3: the city's sentence first
    losses = PersonLosses(np.arange(4), np.zeros(4), value, value, position=position)
    report = capacity_report(ds, losses, 10)
    assert report.p2 == pytest.approx((2.0 + 4.0) / 4)
    assert report.literal is None  # no raw losses given: nothing literal to report
    raw = value.copy()
    raw[:, names.index("gender")] = 0.5
    report = capacity_report(ds, PersonLosses(np.arange(4), np.zeros(4), value, value,
                                              value_raw=raw, position=position), 10)
    assert report.literal["p2"] == pytest.approx(0.5)
    assert report.literal["gender_token_loss"] == pytest.approx(0.5)
    assert report.literal["determined_first"] == {"work_city": 0.5}
    assert report.literal["bits"] - report.bits == pytest.approx(4 * (1.5 - 0.5) / math.log(2))
