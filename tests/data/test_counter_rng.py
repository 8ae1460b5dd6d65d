"""Counter-based RNG: hashes, uniform integers, keyed permutations and random orders."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kcap.data import counter_rng as rng

KEY = rng.stream_key(0, "test")
KEYS = st.integers(min_value=0, max_value=2**64 - 1)


# --- stream_key / hash64 ------------------------------------------------------------------
def test_stream_key_deterministic_and_separates_tags_and_seeds():
    assert rng.stream_key(3, "bioS/names") == rng.stream_key(3, "bioS/names")
    keys = {rng.stream_key(s, t) for s in (0, 1, 2) for t in ("a", "b", "bioS/names", "")}
    assert len(keys) == 12
    assert all(0 <= k < 2**64 for k in keys)


def test_hash64_deterministic_and_dtype():
    a = rng.hash64(KEY, np.arange(100), 7)
    b = rng.hash64(KEY, np.arange(100), 7)
    assert a.dtype == np.uint64 and a.shape == (100,)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 100


def test_hash64_broadcast_shapes_match_elementwise_calls():
    i, j = np.arange(3)[:, None], np.arange(4)[None, :]
    h = rng.hash64(KEY, i, j)
    assert h.shape == (3, 4)
    for a in range(3):
        for b in range(4):
            assert h[a, b] == rng.hash64(KEY, a, b)
    assert rng.hash64(KEY).shape == ()
    assert rng.hash64(KEY, np.zeros((2, 1, 5), int), np.zeros((3, 1), int)).shape == (2, 3, 5)


def test_hash64_depends_on_key_and_index_order():
    assert rng.hash64(KEY, 1, 2) != rng.hash64(KEY, 2, 1)
    assert rng.hash64(KEY, 1, 2) != rng.hash64(KEY + 1, 1, 2)
    assert rng.hash64(KEY, 5) != rng.hash64(KEY, 5, 0)


# --- uniform_int --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 263, 67200])
def test_uniform_int_range_and_dtype(n):
    x = rng.uniform_int(KEY, n, np.arange(5000))
    assert x.dtype == np.int64
    assert x.min() >= 0 and x.max() < n
    if n > 1:
        assert len(np.unique(x)) > 1


def test_uniform_int_chi_square():
    # 100,000 draws over 10 cells: chi-square with 9 degrees of freedom has mean 9 and
    # sd sqrt(18) ~ 4.2; P(chi2_9 > 40) ~ 7e-6, so 40 only fails a biased generator.
    n, draws = 10, 100_000
    counts = np.bincount(rng.uniform_int(KEY, n, np.arange(draws)), minlength=n)
    expected = draws / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 40.0
    # Not a counter in disguise: consecutive equal draws happen ~1/10 of the time
    # (binomial sd ~ 0.001), whereas i % n would give 0 and a constant 1.
    x = rng.uniform_int(KEY, n, np.arange(draws))
    assert abs(np.mean(x[1:] == x[:-1]) - 0.1) < 0.01


def test_uniform_int_broadcast_n():
    n = np.array([2, 50, 263])[None, :]
    x = rng.uniform_int(KEY, n, np.arange(1000)[:, None], np.arange(3)[None, :])
    assert x.shape == (1000, 3)
    assert (x >= 0).all() and (x < n).all()
    assert len(np.unique(x[:, 2])) > 200  # all 263 values are reachable


# --- permute -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4099])
def test_permute_bijection(n):
    y = rng.permute(KEY, n, np.arange(n))
    assert y.dtype == np.int64 and y.shape == (n,)
    np.testing.assert_array_equal(np.sort(y), np.arange(n))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(key=KEYS, n=st.integers(1, 5000), sub=st.integers(0, 2**40))
def test_permute_bijection_property(key, n, sub):
    y = rng.permute(key, n, np.arange(n), sub)
    np.testing.assert_array_equal(np.sort(y), np.arange(n))


def test_permute_is_not_identity_and_depends_on_key():
    n = 1000
    a = rng.permute(KEY, n, np.arange(n))
    b = rng.permute(KEY + 1, n, np.arange(n))
    assert (a != np.arange(n)).mean() > 0.9
    assert (a != b).mean() > 0.9


def test_permute_subkeys_select_distinct_permutations():
    n = 500
    rows = rng.permute(KEY, n, np.arange(n)[None, :], np.arange(6)[:, None])
    assert rows.shape == (6, n)
    for e in range(6):
        np.testing.assert_array_equal(np.sort(rows[e]), np.arange(n))
        np.testing.assert_array_equal(rows[e], rng.permute(KEY, n, np.arange(n), e))
    for e in range(5):
        assert (rows[e] != rows[e + 1]).mean() > 0.9


def test_permute_deterministic_and_elementwise():
    n = 4099
    x = np.array([0, 17, 4098, 2048, 17])
    y = rng.permute(KEY, n, x)
    np.testing.assert_array_equal(y, rng.permute(KEY, n, x))
    assert y[1] == y[4]
    for xi, yi in zip(x, y):
        assert rng.permute(KEY, n, int(xi)) == yi
    assert rng.permute(KEY, n, 5).shape == ()


def test_permute_large_domain_draws_without_replacement():
    n0 = 400 * 400 * 1000
    y = rng.permute(KEY, n0, np.arange(3000))
    assert y.min() >= 0 and y.max() < n0
    assert len(np.unique(y)) == 3000
    assert y.max() > n0 // 2  # spread over the domain, not clustered at the start


def test_permute_rejects_empty_domain():
    with pytest.raises(ValueError, match="n"):
        rng.permute(KEY, 0, np.arange(3))


# --- random_order --------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 2, 6, 50])
def test_random_order_rows_are_permutations(width):
    order = rng.random_order(KEY, np.arange(200), np.arange(200) % 3, width=width)
    assert order.shape == (200, width)
    np.testing.assert_array_equal(np.sort(order, axis=1),
                                  np.broadcast_to(np.arange(width), (200, width)))
    np.testing.assert_array_equal(order, rng.random_order(KEY, np.arange(200), np.arange(200) % 3,
                                                          width=width))


def test_random_order_varies_between_rows():
    order = rng.random_order(KEY, np.arange(500), width=6)
    distinct = {tuple(r) for r in order.tolist()}
    assert len(distinct) > 250  # 720 possible orders, 500 rows
    # Each position holds each item about 1/6 of the time.
    freq = (order[:, 0][:, None] == np.arange(6)).mean(axis=0)
    assert (np.abs(freq - 1 / 6) < 0.07).all()
