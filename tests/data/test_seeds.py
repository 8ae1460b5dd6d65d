"""Seeds reaching the keyed hash are ints in [0, 2**63 - 1]: larger ones used to be masked
to 64 bits, so 2**64 + 5 silently drew the data of seed 5."""
import numpy as np
import pytest

from kcap.data import counter_rng as rng
from kcap.data.biod import BioD, BioDConfig
from kcap.data.bios import BioS, BioSConfig
from kcap.data.stream import ExposureStream, MixtureStream

BIOS = BioS(BioSConfig(n=20))
OUT_OF_RANGE = [2 ** 64 + 5, 2 ** 63, -1]
NOT_INTS = [1.5, "3", True, None]


def _bios(seed):
    return BioS(BioSConfig(n=5, seed=seed))


def _biod(seed):
    return BioD(BioDConfig(n=5, k=2, c=1, d=4, l=1, t=4, seed=seed))


def _stream(seed):
    return ExposureStream(BIOS, 1, window=256, seed=seed)


def _mixture(seed):
    return MixtureStream(ExposureStream(BIOS, 1, window=256),
                         ExposureStream(BIOS, None, window=256), seed=seed)


MAKERS = [lambda seed: rng.stream_key(seed, "t"), _bios, _biod, _stream, _mixture]
NAMES = ["stream_key", "bioS", "bioD", "stream", "mixture"]


@pytest.mark.parametrize("make", MAKERS, ids=NAMES)
@pytest.mark.parametrize("seed", OUT_OF_RANGE)
def test_out_of_range_seed_is_refused_by_name(make, seed):
    with pytest.raises(ValueError, match=r"^seed must be >= 0 and <= 9,223,372,036,854,775,807"):
        make(seed)


@pytest.mark.parametrize("make", MAKERS, ids=NAMES)
@pytest.mark.parametrize("seed", NOT_INTS)
def test_non_integer_seed_is_refused_by_name(make, seed):
    with pytest.raises(TypeError, match=r"^seed must be an integer"):
        make(seed)


@pytest.mark.parametrize("make", MAKERS, ids=NAMES)
def test_largest_seed_is_accepted(make):
    make(rng.MAX_SEED)
    make(np.int64(rng.MAX_SEED))


def test_large_seeds_no_longer_alias_small_ones():
    assert rng.stream_key(rng.MAX_SEED, "t") != rng.stream_key(rng.MAX_SEED - 1, "t")
    with pytest.raises(ValueError):
        rng.stream_key(2 ** 64 + 5, "t")  # once the same key as seed 5


def test_hash_keys_are_checked():
    rng.hash64(2 ** 64 - 1, [1, 2])
    rng.hash64(np.uint64(2 ** 64 - 1), [1, 2])
    for key in (2 ** 64, -1):
        with pytest.raises(ValueError, match="key must be"):
            rng.hash64(key, [1])
    with pytest.raises(TypeError, match="key must be an integer"):
        rng.permute(1.0, 10, [1])
