"""Extractable bits (kcap/qa/report.py): the capacity formula with the questioned
attributes' losses swapped for the answers', by hand-built losses whose bits are known."""
import math

import numpy as np
import pytest

from kcap.capacity import PersonLosses, capacity_report, log2_s0
from kcap.data.bios import BioS, BioSConfig
from kcap.data.qa import qa_pairs
from kcap.qa.answers import AnswerScores, encode_pairs
from kcap.qa.report import build_report, qa_person_losses, wilson

ATTRS = ("birth_date", "birth_city", "university", "major", "employer", "work_city")
P = 10_000


def test_wilson_interval_matches_known_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def setting(seed=0, m=8):
    ds = BioS(BioSConfig(n=40, seed=4))
    rng = np.random.default_rng(seed)
    persons = np.sort(rng.choice(40, m, replace=False))
    A = len(ds.attributes)
    value = rng.uniform(0.1, 3.0, (m, A))
    position = np.tile(np.arange(A), (m, 1))
    position[::2, ATTRS.index("work_city")] = -5  # half the work cities "came first"
    stored = PersonLosses(persons, rng.uniform(1, 4, m), value, value.copy(),
                          np.zeros((m, A), bool), np.zeros((m, A), bool), position=position)
    qa = encode_pairs(ds.tokenizer, qa_pairs(ds, persons, ATTRS), ATTRS)
    return ds, stored, qa


def test_answers_replace_the_questioned_attributes_and_nothing_else():
    ds, stored, qa = setting()
    loss = np.arange(len(qa), dtype=float) / 10
    exact = np.arange(len(qa)) % 3 == 0
    out = qa_person_losses(ds, stored, qa, AnswerScores(loss, exact, exact))
    names = [a.name for a in ds.attributes]
    for i in range(len(qa)):
        row = int(np.searchsorted(stored.persons, qa.person[i]))
        col = names.index(ATTRS[qa.attribute[i]])
        assert out.value[row, col] == loss[i] and out.value_correct[row, col] == exact[i]
    gender = names.index("gender")
    assert np.array_equal(out.value[:, gender], stored.value[:, gender])
    assert np.array_equal(out.name, stored.name)
    # one question per attribute: the work city never enters the employer's term
    report = capacity_report(ds, out, P)
    counted = [a.counted for a in ds.attributes]
    p2 = out.value[:, counted].sum(axis=1).mean()
    assert report.p2 == pytest.approx(p2)


def test_perfect_answers_leave_only_the_name_and_gender_terms():
    ds, stored, qa = setting(seed=1)
    zero = np.zeros(len(qa))
    ones = np.ones(len(qa), bool)
    seen = qa.rows(np.arange(6))
    report = build_report(ds, stored, qa, AnswerScores(zero, ones, ones), seen,
                          AnswerScores(zero[:6], ones[:6], ones[:6]), P)
    n = ds.n_people
    gender = stored.value[:, [a.name for a in ds.attributes].index("gender")].mean()
    assert report["extractable_value_bits"] == pytest.approx(n * (log2_s0(ds) - gender / math.log(2)))
    assert report["exact_match"] == 1.0 and report["attributes"]["major"]["exact_match"] == 1.0
    assert report["stored_bits"] == pytest.approx(capacity_report(ds, stored, P).bits)


def test_answers_as_good_as_the_biographies_extract_everything_stored():
    ds, stored, qa = setting(seed=2)
    stored.position[:] = np.arange(stored.value.shape[1])  # no work city first: no chain term
    names = [a.name for a in ds.attributes]
    loss = stored.value[np.searchsorted(stored.persons, qa.person),
                        [names.index(ATTRS[a]) for a in qa.attribute]]
    none = np.zeros(len(qa), bool)
    report = build_report(ds, stored, qa, AnswerScores(loss, none, none), qa,
                          AnswerScores(loss, none, none), P)
    assert report["extractable_bits"] == pytest.approx(report["stored_bits"])
    assert report["exact_match"] == 0.0 and report["attributes"]["birth_city"]["chance"] == 1 / 200
