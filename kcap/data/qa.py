"""Question/answer pairs for every person and attribute (Parts 3.1/3.3's extraction tests).

"What is the birth city of Anya Briar Forger? Answer: Princeton, NJ." The answer is the
attribute value exactly as the biographies write it; its tokens are marked so a later
evaluation can score exact-match generation or the answer's loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kcap.data.arguments import check_index_array
from kcap.data.memory_budget import check_memory
from kcap.data.pools import birth_date_text
from kcap.data.templates import ATTRIBUTES, load_questions

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
    if getattr(dataset, "kind", None) != "bioS":
        raise TypeError("qa_pairs needs a bioS data set")
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
