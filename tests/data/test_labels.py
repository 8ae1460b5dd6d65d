"""Label storage: the smallest unsigned dtypes, -1 as the dtype's largest value, and back."""
import numpy as np
import pytest

from kcap.data.labels import SPECIAL, VALUE, TokenLabels, storage_dtype


@pytest.mark.parametrize("high, dtype", [(0, np.uint8), (254, np.uint8), (255, np.uint16),
                                         (65_534, np.uint16), (65_535, np.uint32),
                                         (2 ** 32 - 2, np.uint32), (2 ** 32 - 1, np.uint64)])
def test_storage_dtype_keeps_room_for_the_padding_code(high, dtype):
    assert storage_dtype(high) == dtype


def _labels(people, chunks, attributes, n=500, seed=0):
    r = np.random.default_rng(seed)
    field = r.choice([0, 1, SPECIAL, VALUE + attributes - 1], n).astype(np.int16)
    chunk = r.integers(-1, chunks, n).astype(np.int16)
    person = r.integers(-1, people, n).astype(np.int64)
    person[:2] = [-1, people - 1]  # both ends
    return TokenLabels(field, chunk, person)


@pytest.mark.parametrize("people, chunks, attributes, person_dtype, chunk_dtype", [
    (255, 1, 7, np.uint8, np.uint8), (256, 2, 99, np.uint16, np.uint8),
    (65_535, 255, 4, np.uint16, np.uint8), (65_536, 256, 4, np.uint32, np.uint16),
    (160_000_000, 32_767, 99, np.uint32, np.uint16)])
def test_compact_round_trips_in_the_smallest_dtypes(people, chunks, attributes, person_dtype,
                                                     chunk_dtype):
    labels = _labels(people, chunks, attributes).reshape(20, 25)
    small = labels.compact(people, chunks, attributes)
    assert (small.field.dtype, small.chunk.dtype, small.person.dtype) == (
        np.uint8, chunk_dtype, person_dtype)
    assert small.person.shape == (20, 25)
    back = small.expand()
    assert (back.field.dtype, back.chunk.dtype, back.person.dtype) == (np.int16, np.int16, np.int64)
    for name in ("field", "chunk", "person"):
        np.testing.assert_array_equal(getattr(back, name), getattr(labels, name))


def test_compact_refuses_labels_outside_the_bounds():
    labels = _labels(10, 2, 3)
    with pytest.raises(ValueError, match=r"person labels must lie in \[-1, 8\]"):
        labels.compact(9, 2, 3)
    with pytest.raises(ValueError, match="chunk labels"):
        labels.compact(10, 1, 3)
    with pytest.raises(ValueError, match="field labels"):
        labels.compact(10, 2, 2)


def test_expand_needs_compact_labels():
    with pytest.raises(TypeError, match="field must hold unsigned integers"):
        _labels(10, 2, 3).expand()
