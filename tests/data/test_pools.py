"""Value pools: sizes, uniqueness, formats, name ids and birth dates."""
import re
from importlib import resources

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kcap.data import pools as P

POOLS = P.load_pools()
NAME_RE = re.compile(r"^[A-Z][a-z]+$")
CITY_RE = re.compile(r"^[A-Z][A-Za-z .'-]*[a-z.], [A-Z]{2}$")


def test_pool_sizes_are_the_papers():
    expected = {"first_names": 400, "middle_names": 400, "last_names": 1000,
                "birth_cities": 200, "universities": 300, "majors": 100, "employers": 263}
    assert P.POOL_SIZES == expected
    for key, size in expected.items():
        assert len(getattr(POOLS, key)) == size, key
    assert len(POOLS.employer_cities) == 263


@pytest.mark.parametrize("key", list(P.POOL_SIZES))
def test_pool_entries_unique_and_clean(key):
    values = getattr(POOLS, key)
    assert len(set(values)) == len(values)
    for v in values:
        assert v == v.strip() and v and "\t" not in v and "  " not in v
        assert v.isascii()


@pytest.mark.parametrize("key", ["first_names", "middle_names", "last_names"])
def test_name_parts_are_single_capitalized_words(key):
    bad = [v for v in getattr(POOLS, key) if not NAME_RE.match(v)]
    assert bad == []


def test_cities_are_city_comma_state():
    bad = [c for c in POOLS.birth_cities + POOLS.employer_cities if not CITY_RE.match(c)]
    assert bad == []


def test_employer_cities_aligned_with_employers_file():
    text = (resources.files("kcap.data") / "pools" / "employers.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line]
    assert [r[0] for r in rows] == list(POOLS.employers)
    assert [r[1] for r in rows] == list(POOLS.employer_cities)
    # Headquarters repeat across employers (it is a lookup, not a second pool).
    assert len(set(POOLS.employer_cities)) < len(POOLS.employer_cities)


def test_n_full_names():
    assert P.N_FULL_NAMES == 160_000_000
    assert P.N_FULL_NAMES == len(POOLS.first_names) * len(POOLS.middle_names) * len(POOLS.last_names)


def test_full_name_extremes():
    assert POOLS.full_name(0) == " ".join(
        (POOLS.first_names[0], POOLS.middle_names[0], POOLS.last_names[0]))
    assert POOLS.full_name(P.N_FULL_NAMES - 1) == " ".join(
        (POOLS.first_names[-1], POOLS.middle_names[-1], POOLS.last_names[-1]))
    # first-major: id 400*1000 is the second first name with the first middle/last.
    assert POOLS.full_name(400_000) == " ".join(
        (POOLS.first_names[1], POOLS.middle_names[0], POOLS.last_names[0]))
    assert POOLS.full_name(1000) == " ".join(
        (POOLS.first_names[0], POOLS.middle_names[1], POOLS.last_names[0]))
    assert POOLS.full_name(1) == " ".join(
        (POOLS.first_names[0], POOLS.middle_names[0], POOLS.last_names[1]))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(name_id=st.integers(0, P.N_FULL_NAMES - 1))
def test_full_name_and_split_name_id_agree(name_id):
    f, m, l = P.split_name_id(name_id)
    assert 0 <= f < 400 and 0 <= m < 400 and 0 <= l < 1000
    assert (f * 400 + m) * 1000 + l == name_id
    assert POOLS.full_name(name_id) == f"{POOLS.first_names[f]} {POOLS.middle_names[m]} " \
                                       f"{POOLS.last_names[l]}"


def test_split_name_id_vectorized_matches_scalar():
    ids = np.array([0, 1, 999, 1000, 399_999, 400_000, 123_456_789, P.N_FULL_NAMES - 1])
    f, m, l = P.split_name_id(ids)
    for i, nid in enumerate(ids):
        assert (f[i], m[i], l[i]) == P.split_name_id(int(nid))
    np.testing.assert_array_equal((f * 400 + m) * 1000 + l, ids)
    # Distinct ids are distinct names.
    names = {POOLS.full_name(int(i)) for i in ids}
    assert len(names) == len(ids)


def test_birth_date_text_by_hand():
    assert P.N_BIRTH_DATES == 67_200
    assert P.birth_date_text(0) == "January 1, 1900"
    assert P.birth_date_text(67_199) == "December 28, 2099"
    # month 5 (June), day index 13 (14th), year index 85 (1985): 5*5600 + 13*200 + 85.
    assert P.birth_date_text(30_685) == "June 14, 1985"
    assert P.birth_date_text(199) == "January 1, 2099"
    assert P.birth_date_text(200) == "January 2, 1900"
    assert P.birth_date_text(5600) == "February 1, 1900"


def test_birth_date_text_all_distinct():
    texts = [P.birth_date_text(i) for i in range(P.N_BIRTH_DATES)]
    assert len(set(texts)) == P.N_BIRTH_DATES
    assert all(re.fullmatch(r"[A-Z][a-z]+ ([1-9]|1[0-9]|2[0-8]), (19[0-9][0-9]|20[0-9][0-9])", t)
               for t in texts[::97])


def test_load_pools_is_cached():
    assert P.load_pools() is POOLS
