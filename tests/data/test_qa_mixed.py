"""Mixed QA pretraining data (kcap/data/qa_mixed.py) and the QA halves (kcap/data/qa.py):
a mixed person's rendering is its biography then its QA block, nobody else changes, the
mixed people lie in the fine-tuning half, and the trainer's config refuses what the test
half could not survive."""
import numpy as np
import pytest

from kcap.data.bios import BioS, BioSConfig
from kcap.data.labels import TEXT
from kcap.data.qa import mixed_people, qa_halves, qa_pairs
from kcap.data.qa_mixed import QAMixed
from kcap.data.stream import ExposureStream
from kcap.data.tokenizer import EOS_ID
from kcap.run_config import DataConfig


def test_halves_split_everyone_once_and_mixed_people_sit_in_the_first():
    for n in (1, 2, 7, 100):
        tune, test = qa_halves(n, 5)
        assert len(tune) == n // 2 and len(test) == n - n // 2
        assert np.array_equal(np.sort(np.concatenate([tune, test])), np.arange(n))
        for fraction in (0.0, 0.2, 0.5):
            mixed = mixed_people(n, 5, fraction)
            assert len(mixed) == int(fraction * n) and np.isin(mixed, tune).all()
    assert not np.array_equal(qa_halves(100, 5)[0], qa_halves(100, 6)[0])  # keyed by the seed
    with pytest.raises(ValueError, match="fraction must be in"):
        mixed_people(10, 0, 0.6)


def test_a_mixed_person_renders_biography_then_its_qa_block():
    ds = BioS(BioSConfig(n=40, seed=2, variant="online"))
    mixed = QAMixed(ds, 0.5, 2)
    assert len(mixed.people) == 20
    persons, exposures = np.arange(40), np.full(40, 3)
    base, both = ds.render(persons, exposures, labels=True), mixed.render(persons, exposures, labels=True)
    assert np.array_equal(both.lengths, mixed.lengths(persons, exposures))
    starts, base_starts = np.cumsum(both.lengths) - both.lengths, np.cumsum(base.lengths) - base.lengths
    for p in range(40):
        bio = base.tokens[base_starts[p]:base_starts[p] + base.lengths[p]]
        got = both.tokens[starts[p]:starts[p] + both.lengths[p]]
        assert np.array_equal(got[:len(bio)], bio)
        field = both.labels.field[starts[p]:starts[p] + both.lengths[p]]
        assert np.array_equal(field[:len(bio)], base.labels.field[base_starts[p]:base_starts[p] + len(bio)])
        block = got[len(bio):]
        if p not in mixed.people:
            assert len(block) == 0
            continue
        assert block[-1] == EOS_ID and (field[len(bio):] == TEXT).all()
        expected = " ".join(q.text for q in qa_pairs(ds, [p])) + "<|endoftext|>"
        assert ds.tokenizer.decode(block) == expected
    assert (both.labels.person == np.repeat(persons, both.lengths)).all()
    assert mixed.max_length() >= both.lengths.max()
    assert set(ds.used_token_ids()) < set(mixed.used_token_ids())  # the question words


def test_mixed_data_streams_and_is_its_own_stream():
    ds = BioS(BioSConfig(n=30, seed=1))
    plain = ExposureStream(ds, 2, 256, 1)
    mixed = ExposureStream(QAMixed(ds, 0.5, 1), 2, 256, 1)
    assert plain.fingerprint != mixed.fingerprint  # a checkpoint of one cannot resume the other
    windows = mixed.next_windows(4)
    assert windows.tokens.shape == (4, 256)
    assert ds.tokenizer.decode(windows.tokens.ravel()).count(" Answer:") > 0


def test_the_config_keeps_the_test_half_clean():
    assert DataConfig(qa_fraction=0.5).qa_fraction == 0.5
    with pytest.raises(ValueError, match=r"qa_fraction must be in \[0, 0.5\]"):
        DataConfig(qa_fraction=0.7)
    with pytest.raises(ValueError, match="QA pairs are defined for bioS and bioR"):
        DataConfig(kind="bioD", qa_fraction=0.1)
    with pytest.raises(TypeError, match="qa_fraction must be a number"):
        DataConfig(qa_fraction="half")
