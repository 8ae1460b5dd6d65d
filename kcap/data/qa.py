"""Question/answer pairs for every person and attribute (Parts 3.1/3.3's extraction tests).

"What is the birth city of Anya Briar Forger? Answer: Princeton, NJ." The answer is the
attribute value exactly as the biographies write it; its tokens are marked so a later
evaluation can score exact-match generation or the answer's loss.

``qa_halves`` splits the people in two by a keyed permutation of the data seed: QA
fine-tuning (kcap.qa) trains on the first half and tests on the second, and mixed
pretraining (``data.qa_fraction``) draws its people from the front of the same permutation,
so the tested half never has its QA pairs seen in any training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kcap.data import counter_rng as rng
from kcap.data.arguments import check_index_array, check_int
from kcap.data.memory_budget import check_memory
from kcap.data.pools import birth_date_text
from kcap.data.templates import ATTRIBUTES, load_questions

QA_KINDS = ("bioS", "bioR")  # data sets whose people have bioS profiles
_PAIR_BYTES = 384  # a QAPair with its strings (measured ~240 with tracemalloc), rounded up


@dataclass(frozen=True)
class QAPair:
    person: int
    attribute: str
    question: str  # "What is the birth city of Anya Briar Forger?"
    answer: str    # "Princeton, NJ"

    @property
    def text(self) -> str:
        return f"{self.question} Answer: {self.answer}."


def qa_pairs(dataset, persons=None, attributes=ATTRIBUTES) -> list[QAPair]:
    """QA pairs of a bioS data set for ``persons`` (default all) and ``attributes``."""
    if getattr(dataset, "kind", None) not in QA_KINDS:
        raise TypeError(f"qa_pairs needs a bioS or bioR data set, got "
                        f"{getattr(dataset, 'kind', type(dataset).__name__)}")
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; allowed: {list(ATTRIBUTES)}")
    count = dataset.n_people if persons is None else int(np.size(persons))
    check_memory(count * len(attributes) * _PAIR_BYTES, f"{count * len(attributes):,} QA pairs",
                 "the number of persons (ask for them in slices)")
    persons = np.arange(dataset.n_people) if persons is None else persons
    persons = check_index_array("persons", persons, dataset.n_people)
    prof = dataset.profiles(persons)
    pools, questions = dataset.pools, load_questions()
    value_pools = {"birth_city": pools.birth_cities, "university": pools.universities,
                   "major": pools.majors, "employer": pools.employers,
                   "work_city": pools.employer_cities}
    out = []
    for i, person in enumerate(persons.tolist()):
        name = pools.full_name(int(prof["name_id"][i]))
        for attr in attributes:
            index = int(prof[attr][i])
            answer = birth_date_text(index) if attr == "birth_date" else value_pools[attr][index]
            out.append(QAPair(person, attr, questions[attr].replace("{name}", name), answer))
    return out


def encode_qa(tokenizer, pair: QAPair) -> tuple[list[int], list[bool]]:
    """Token ids of ``pair.text`` and a mask marking the answer's tokens."""
    prompt = tokenizer.encode(f"{pair.question} Answer:")
    answer = tokenizer.encode(" " + pair.answer)
    end = tokenizer.encode(".")
    return prompt + answer + end, [False] * len(prompt) + [True] * len(answer) + [False] * len(end)


def qa_order(n: int, seed: int) -> np.ndarray:
    """(n,) int64: the keyed permutation of people that splits them for QA."""
    check_int("n", n, 1)
    return rng.permute(rng.stream_key(seed, "qa/halves"), n, np.arange(n, dtype=np.int64))


def qa_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fine-tuning half, test half): sorted int64 person indices, n // 2 and n - n // 2."""
    order = qa_order(n, seed)
    return np.sort(order[:n // 2]), np.sort(order[n // 2:])


def mixed_people(n: int, seed: int, fraction: float) -> np.ndarray:
    """Sorted people whose QA pairs a ``fraction`` (0 .. 0.5) mixes into pretraining: the
    first floor(fraction * n) of ``qa_order``, so always inside the fine-tuning half."""
    if not 0 <= fraction <= 0.5:
        raise ValueError(f"fraction must be in [0, 0.5], got {fraction}")
    return np.sort(qa_order(n, seed)[:int(fraction * n)])
