"""Sizes that would need tens of GB are refused before anything is allocated, with the
estimate and the parameter to lower; bounded sizes stay bounded."""
import tracemalloc

import numpy as np
import pytest

from kcap.data import biod as biod_module
from kcap.data import memory_budget
from kcap.data.biod import MAX_C, BioD, BioDConfig, biography_tokens, chunk_space
from kcap.data.bios import MAX_RENDERINGS, BioS, BioSConfig, parse_variant
from kcap.data.memory_budget import FALLBACK_BYTES, check_memory, format_bytes, memory_limit
from kcap.data.qa import qa_pairs
from kcap.data.stream import ExposureStream

@pytest.fixture(autouse=True)
def a_16_gib_machine(monkeypatch):
    """The refusals below must not depend on the host: with 1 TB free, a 64 GiB window would
    fit and be built. Every test here sees a machine with 16 GiB available."""
    from kcap.data import memory_budget

    monkeypatch.setattr(memory_budget, "available_bytes", lambda: 16 << 30)


BIOS = BioS(BioSConfig(n=50, seed=1))


# --- the budget itself ------------------------------------------------------------------
def test_limit_is_the_cap_or_the_available_memory(monkeypatch):
    limit, which = memory_limit()
    assert 0 < limit and which
    monkeypatch.setattr(memory_budget, "available_bytes", lambda: 1 << 30)
    assert memory_limit() == (1 << 30, "the memory available on this machine")
    monkeypatch.setattr(memory_budget, "available_bytes", lambda: None)
    assert memory_limit() == (FALLBACK_BYTES, "8 GiB (this machine's available memory could not be read)")


def test_check_memory_states_estimate_limit_and_what_to_lower():
    check_memory(1 << 20, "a small thing", "nothing")  # a MiB always fits
    with pytest.raises(ValueError, match=r"^a big thing would need about 1 TiB of memory, more "
                                         r"than .*; lower X or Y$"):
        check_memory(1 << 40, "a big thing", "X or Y")


def test_format_bytes():
    assert format_bytes(512) == "512 bytes"
    assert format_bytes(3 << 20) == "3 MiB"
    assert format_bytes(int(2.5 * (1 << 30))) == "2.5 GiB"
    assert format_bytes(1500 * (1 << 40)) == "1.5e+03 TiB"


# --- bioD ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, lower", [
    (dict(d=10 ** 9, l=8, t=100), "K, D or L"),     # chunk tables: ~3 TiB
    (dict(d=100, l=10 ** 9, t=50), "K, D or L"),    # T^L not even computed
    (dict(d=1, l=10 ** 9, t=1), "K, C or L"),       # a biography of 16 chunks of 10^9
    (dict(d=100, l=2, t=10 ** 9), "T"),             # the alphabet's tokenizer
    (dict(d=100, l=10 ** 6, t=2, c=1000), "K, C or L"),
])
def test_biod_refuses_sizes_that_do_not_fit(sizes, lower):
    config = BioDConfig(**{**dict(n=10, k=8, c=2), **sizes})
    with pytest.raises(ValueError, match=r"bioD with K=.* would need about [0-9.e+]+ [GT]iB of "
                                         rf"memory, more than .*; lower {lower}$"):
        BioD(config)


def test_biod_one_huge_biography_is_refused_naming_c():
    with pytest.raises(ValueError, match="one biography .* lower K, C or L"):
        BioD(BioDConfig(n=10, k=99, c=MAX_C, d=10, l=10 ** 4, t=10))


def test_biod_c_is_bounded_by_its_int16_labels():
    BioD(BioDConfig(n=2, k=1, c=300, d=3, l=1, t=3))
    with pytest.raises(ValueError, match="c must be >= 1 and <= 32,767"):
        BioD(BioDConfig(n=2, k=1, c=MAX_C + 1, d=3, l=1, t=3))


def test_chunk_space_is_exact_when_small_and_capped_when_huge():
    assert chunk_space(50, 2) == 2500 and chunk_space(1, 10 ** 12) == 1
    assert chunk_space(3, 40) == 3 ** 40
    assert chunk_space(2, 10 ** 9) == chunk_space(10 ** 6, 10 ** 5) == 1 << 1024


@pytest.mark.parametrize("config", [BioDConfig(n=3, k=1, c=1, d=1, l=1, t=1),
                                    BioDConfig(n=3, k=7, c=3, d=20, l=4, t=9),
                                    BioDConfig(n=3, k=99, c=2, d=5, l=1, t=5)])
def test_biography_token_bound_holds(config):
    assert BioD(config).max_length() <= biography_tokens(config)


def test_biod_lengths_gather_in_bounded_chunks(monkeypatch):
    ds = BioD(BioDConfig(n=2000, k=50, c=50, d=20, l=1, t=20))
    persons = np.arange(2000)
    expected = np.full(2000, ds.max_length())
    monkeypatch.setattr(biod_module, "_LENGTHS_CHUNK_ENTRIES", 1 << 14)
    tracemalloc.start()
    try:
        lengths = ds.lengths(persons, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(lengths, expected)
    # all at once, the (2000, 5201) int64 entries alone would take 83 MB
    assert peak < 16 << 20


# --- bioS variants, streams, QA ---------------------------------------------------------------
@pytest.mark.parametrize("variant", ["multi" + "9" * 21, "multi99999999999", "multi" + "9" * 5000,
                                     f"multi{MAX_RENDERINGS + 1}+permute"])
def test_multi_with_huge_m_is_refused(variant):
    with pytest.raises(ValueError, match="multiM needs M <= 1,000,000,000 renderings"):
        BioS(BioSConfig(n=10, variant=variant))


def test_multi_at_the_bound_renders():
    assert parse_variant(f"multi{MAX_RENDERINGS}").renderings == MAX_RENDERINGS
    ds = BioS(BioSConfig(n=10, variant=f"multi{MAX_RENDERINGS}"))
    assert ds.render([0, 1], [5, 2 ** 40]).lengths.min() > 0


def test_window_that_does_not_fit_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"reading 1 window\(s\) of 1,000,000,000 tokens would "
                                         r"need about .* GiB .*; lower window$"):
        ExposureStream(BIOS, 1, window=10 ** 9)


def test_read_that_does_not_fit_is_refused():
    s = ExposureStream(BIOS, 1, window=512)
    with pytest.raises(ValueError, match="lower count"):
        s.next_windows(10 ** 9)
    assert s.cursor == 0 and len(s.next_windows(1)) == 1  # nothing was consumed


def test_exposures_are_bounded_so_positions_stay_int64():
    with pytest.raises(ValueError, match="exposures must be >= 1 and <= "):
        ExposureStream(BIOS, 2 ** 62, window=512)


def test_qa_pairs_for_too_many_people_are_refused_before_allocating():
    big = BioS(BioSConfig(n=10 ** 8))
    with pytest.raises(ValueError, match="600,000,000 QA pairs would need .* lower the number "
                                         "of persons"):
        qa_pairs(big)
    assert len(qa_pairs(big, [5, 7])) == 12


def test_small_estimates_do_not_read_the_machine(monkeypatch):
    def unreadable():
        raise AssertionError("read /proc/meminfo for a small estimate")
    monkeypatch.setattr(memory_budget, "available_bytes", unreadable)
    check_memory(32 << 20, "a read of 256 windows", "count")
