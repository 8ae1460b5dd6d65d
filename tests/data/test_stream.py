"""Exposure streams: packing, epochs, resume, seek, sharding and useful/junk mixtures."""
from collections import Counter

import numpy as np
import pytest

from kcap.data.biod import BioD, BioDConfig
from kcap.data.bios import BioS, BioSConfig
from kcap.data.labels import SPECIAL, TokenLabels
from kcap.data.stream import ExposureStream, MixtureStream
from kcap.data.tokenizer import PAD_ID, USEFUL_ID

N, E, W = 40, 3, 128
BIOS = BioS(BioSConfig(N, seed=1))
BIOD = BioD(BioDConfig(n=N, k=3, c=2, d=10, l=2, t=20))


def _read_all(stream, count=5):
    out = []
    while True:
        w = stream.next_windows(count)
        if not len(w):
            return out
        assert w.tokens.shape == (len(w), stream.window)
        out.append(w)


def _flat(windows, labels=False):
    if labels:
        return TokenLabels.concatenate([w.labels.reshape(-1) for w in windows])
    return np.concatenate([w.tokens.reshape(-1) for w in windows])


@pytest.mark.parametrize("ds,window,count", [(BIOS, W, 5), (BIOS, 300, 1), (BIOD, 64, 7)])
def test_windows_are_the_padded_concatenation_of_renders(ds, window, count):
    s = ExposureStream(ds, E, window=window, seed=4, labels=True)
    assert s.total_bios == N * E
    windows = _read_all(s, count)
    r = ds.render(*s.bios(np.arange(N * E)), labels=True)
    pad = -len(r.tokens) % window
    expected = np.concatenate([r.tokens, np.full(pad, PAD_ID)])
    np.testing.assert_array_equal(_flat(windows), expected)
    lab = _flat(windows, labels=True)
    np.testing.assert_array_equal(lab.field[:len(r.tokens)], r.labels.field)
    np.testing.assert_array_equal(lab.chunk[:len(r.tokens)], r.labels.chunk)
    np.testing.assert_array_equal(lab.person[:len(r.tokens)], r.labels.person)
    assert (lab.field[len(r.tokens):] == SPECIAL).all() and (lab.person[len(r.tokens):] == -1).all()
    assert s.exhausted and s.exposures_done == E
    assert len(s.next_windows(3)) == 0


def test_epochs_are_permutations_and_exposures_complete():
    s = ExposureStream(BIOS, E, window=W, seed=2)
    persons, exposures = s.bios(np.arange(N * E))
    assert Counter(zip(persons.tolist(), exposures.tolist())) == Counter(
        (p, e) for p in range(N) for e in range(E))
    for e in range(E):
        np.testing.assert_array_equal(np.sort(persons[e * N:(e + 1) * N]), np.arange(N))
        assert (exposures[e * N:(e + 1) * N] == e).all()
    assert not np.array_equal(persons[:N], persons[N:2 * N])  # a fresh order per epoch
    other = ExposureStream(BIOS, E, window=W, seed=3).bios(np.arange(N))[0]
    assert not np.array_equal(persons[:N], other)


def test_endless_stream_keeps_going():
    s = ExposureStream(BIOS, None, window=W)
    assert s.total_bios is None
    w = s.next_windows(N * 2)  # ~ 1.2 epochs of tokens
    assert len(w) == N * 2 and not (w.tokens == PAD_ID).any() and not s.exhausted
    assert s.exposures_done > 1


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("k", [0, 1, 7, 30])
def test_resume_from_state_dict(k, labels):
    a = ExposureStream(BIOS, E, window=W, seed=5, labels=labels)
    if k:
        a.next_windows(k)
    state = a.state_dict()
    rest = _read_all(a, 4)
    b = ExposureStream(BIOS, E, window=W, seed=5, labels=labels)
    b.next_windows(2)  # dirty buffer, then restore
    b.load_state_dict(state)
    rest_b = _read_all(b, 3)
    np.testing.assert_array_equal(_flat(rest), _flat(rest_b))
    if labels:
        np.testing.assert_array_equal(_flat(rest, True).field, _flat(rest_b, True).field)
        np.testing.assert_array_equal(_flat(rest, True).person, _flat(rest_b, True).person)


def test_read_chunking_does_not_matter():
    one = _flat(_read_all(ExposureStream(BIOS, E, window=W), 1))
    many = _flat(_read_all(ExposureStream(BIOS, E, window=W), 1000))
    np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("ds,k", [(BIOS, 0), (BIOS, 1), (BIOS, 13), (BIOS, 41), (BIOD, 9),
                                  (BIOS, 10_000)])
def test_seek_equals_reading(ds, k):
    a, b = ExposureStream(ds, E, window=W, seed=6), ExposureStream(ds, E, window=W, seed=6)
    if k:
        a.next_windows(k)
    b.next_windows(3)
    b.seek(k, chunk=17)  # small chunks exercise the chunk loop
    assert b.state_dict() == a.state_dict()
    np.testing.assert_array_equal(a.next_windows(4).tokens, b.next_windows(4).tokens)
    assert b.exhausted == (k == 10_000)


def test_seek_endless_stream():
    a, b = ExposureStream(BIOS, None, window=W), ExposureStream(BIOS, None, window=W)
    a.next_windows(100)
    b.seek(100)
    assert a.state_dict() == b.state_dict()
    np.testing.assert_array_equal(a.next_windows(3).tokens, b.next_windows(3).tokens)


@pytest.mark.parametrize("change", [dict(seed=1), dict(window=256), dict(exposures=2),
                                    dict(rank=1, world_size=2), dict(world_size=2),
                                    dict(ds=BioS(BioSConfig(N, seed=2))),
                                    dict(ds=BioS(BioSConfig(N, seed=1, variant="simple")))])
def test_load_state_dict_refuses_other_configuration(change):
    base = dict(ds=BIOS, exposures=E, window=W, seed=0, rank=0, world_size=1)
    a = ExposureStream(*[base[k] for k in ("ds", "exposures", "window", "seed", "rank",
                                           "world_size")])
    other = base | change
    b = ExposureStream(other["ds"], other["exposures"], other["window"], other["seed"],
                       other["rank"], other["world_size"])
    a.next_windows(2)
    with pytest.raises(ValueError, match="different"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("world", [2, 3, 7])
def test_sharding_covers_the_same_biographies(world):
    total = N * E
    ref = ExposureStream(BIOS, E, window=W)
    expected = Counter(zip(*(x.tolist() for x in ref.bios(np.arange(total)))))
    got, tokens = Counter(), 0
    for rank in range(world):
        s = ExposureStream(BIOS, E, window=W, rank=rank, world_size=world)
        persons, exposures = s.bios(np.arange(s.total_bios))
        got.update(zip(persons.tolist(), exposures.tolist()))
        r = BIOS.render(persons, exposures)
        flat = _flat(_read_all(s))
        np.testing.assert_array_equal(flat[:len(r.tokens)], r.tokens)
        assert (flat[len(r.tokens):] == PAD_ID).all()
        tokens += len(r.tokens)
    assert got == expected and sum(got.values()) == total
    assert tokens == len(BIOS.render(*ref.bios(np.arange(total))).tokens)


USEFUL = BioS(BioSConfig(N, seed=1, marker=True))
JUNK = BioS(BioSConfig(N, seed=1, person_offset=N))


def _mixture(ratio, labels=False, seed=0):
    return MixtureStream(ExposureStream(USEFUL, 2, window=W, labels=labels),
                         ExposureStream(JUNK, None, window=W, labels=labels), ratio, seed=seed)


@pytest.mark.parametrize("ratio", [(1, 7), (2, 3)])
def test_mixture_exact_ratio_and_pure_windows(ratio):
    u, j = ratio
    m = _mixture(ratio, labels=True)
    w = m.next_windows(10_000)
    n_useful_windows = len(_flat(_read_all(ExposureStream(USEFUL, 2, window=W)))) // W
    mask = m.is_useful(np.arange(len(w)))
    np.testing.assert_array_equal(w.useful, mask)
    assert mask.sum() == n_useful_windows and mask[-1]  # ends with the useful stream
    blocks = len(w) // (u + j)
    assert (mask[:blocks * (u + j)].reshape(blocks, u + j).sum(1) == u).all()
    assert len({tuple(np.flatnonzero(b)) for b in mask[:blocks * (u + j)].reshape(blocks, -1)}) > 1
    has_marker = (w.tokens == USEFUL_ID).any(1)
    np.testing.assert_array_equal(has_marker[:-1], mask[:-1])  # (the last may be a tail)
    # Useful windows are the useful stream, junk windows the junk stream, in order.
    np.testing.assert_array_equal(w.tokens[mask].reshape(-1), _flat(_read_all(
        ExposureStream(USEFUL, 2, window=W))))
    np.testing.assert_array_equal(w.tokens[~mask], ExposureStream(JUNK, None, window=W)
                                  .next_windows(int((~mask).sum())).tokens)
    assert len(m.next_windows(8)) == 0


def test_mixture_resume():
    a = _mixture((1, 7))
    a.next_windows(13)
    state = a.state_dict()
    rest = a.next_windows(50).tokens
    b = _mixture((1, 7))
    b.next_windows(3)
    b.load_state_dict(state)
    np.testing.assert_array_equal(b.next_windows(50).tokens, rest)
    with pytest.raises(ValueError, match="different"):
        _mixture((1, 7), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="different"):
        _mixture((2, 3)).load_state_dict(state)


def test_mixture_labels_junk_only_request():
    m = _mixture((1, 7), labels=True)
    for _ in range(8):  # one block, one window at a time: 7 requests hold only junk
        w = m.next_windows(1)
        assert len(w) == 1 and w.labels.field.shape == (1, W)


def test_mixture_read_size_does_not_matter():
    big = len(_mixture((1, 7)).next_windows(10_000))
    m, small = _mixture((1, 7)), 0
    while len(m.next_windows(1)) and small < 10_000:
        small += 1
    assert small == big


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="window"):
        ExposureStream(BIOS, E, window=BIOS.max_length() - 1)
    ExposureStream(BIOS, E, window=BIOS.max_length())  # exactly one biography fits
    with pytest.raises(ValueError, match="window"):
        ExposureStream(BIOD, E, window=BIOD.max_length() - 1)
    with pytest.raises(ValueError, match="exposures"):
        ExposureStream(BIOS, 0, window=W)
    with pytest.raises(ValueError, match="rank"):
        ExposureStream(BIOS, E, window=W, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        ExposureStream(BIOS, E, window=W, world_size=0)
    with pytest.raises(ValueError, match="count"):
        ExposureStream(BIOS, E, window=W).next_windows(0)
    with pytest.raises(ValueError, match="window"):
        MixtureStream(ExposureStream(USEFUL, 1, window=W), ExposureStream(JUNK, None, window=256))
    with pytest.raises(ValueError, match="useful"):
        _mixture((0, 7))
    with pytest.raises(ValueError, match="ratio"):
        _mixture((1, 2, 3))


def test_wrong_argument_types_are_named():
    with pytest.raises(TypeError, match="dataset must be a BioS or BioD, got object"):
        ExposureStream(object(), E, window=W)
    with pytest.raises(TypeError, match="useful and junk must be ExposureStreams"):
        MixtureStream(BIOS, ExposureStream(BIOS, None, window=W))
    with pytest.raises(TypeError, match="config must be a BioSConfig, got dict"):
        BioS({"n": 3})
    with pytest.raises(TypeError, match="config must be a BioDConfig, got NoneType"):
        BioD(None)
