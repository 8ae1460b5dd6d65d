import pytest

from kcap.data.bios import BioS, BioSConfig
from kcap.data.pools import birth_date_text
from kcap.data.qa import encode_qa, qa_pairs
from kcap.data.templates import ATTRIBUTES


def test_one_pair_per_person_and_attribute_with_the_profile_value():
    ds = BioS(BioSConfig(n=30, seed=2))
    pairs = qa_pairs(ds)
    assert len(pairs) == 30 * len(ATTRIBUTES)
    prof = ds.profiles(range(30))
    for pair in pairs:
        i = pair.person
        name = ds.pools.full_name(int(prof["name_id"][i]))
        assert name in pair.question and pair.question.endswith("?")
        if pair.attribute == "birth_date":
            assert pair.answer == birth_date_text(int(prof["birth_date"][i]))
        if pair.attribute == "work_city":
            assert pair.answer == ds.pools.employer_cities[int(prof["employer"][i])]
        # The answer is written in the biographies exactly as asked.
        assert pair.answer in ds.text(i, 0)


def test_encoding_marks_the_answer_and_round_trips():
    ds = BioS(BioSConfig(n=5))
    for pair in qa_pairs(ds, [0, 4]):
        ids, mask = encode_qa(ds.tokenizer, pair)
        assert ds.tokenizer.decode(ids) == pair.text
        assert ds.tokenizer.decode([t for t, m in zip(ids, mask) if m]) == " " + pair.answer


def test_bad_arguments():
    ds = BioS(BioSConfig(n=5))
    with pytest.raises(ValueError, match="persons"):
        qa_pairs(ds, [5])
    with pytest.raises(ValueError, match="unknown attributes"):
        qa_pairs(ds, [0], attributes=("height",))
