"""QA pairs as batches and their scoring (kcap/qa/answers.py): the one-pass teacher-forced
verdict is greedy generation's, checked against real greedy decoding with models whose
answers are right, wrong at the first token, or wrong later; the loss sums the value's
tokens only."""
import math

import numpy as np
import pytest
import torch

from kcap.data.bios import BioS, BioSConfig
from kcap.data.qa import qa_pairs
from kcap.data.tokenizer import EOS_ID, PAD_ID
from kcap.qa.answers import encode_pairs, greedy_answer, qa_loss, score_answers

ATTRS = ("birth_date", "birth_city", "university", "major", "employer", "work_city")


@pytest.fixture(scope="module")
def qa():
    ds = BioS(BioSConfig(n=12, seed=3))
    return ds, encode_pairs(ds.tokenizer, qa_pairs(ds, np.arange(12)), ATTRS)


class LookupModel:
    """Logits (B, T, V) whose argmax at each position is the next token of the pair whose
    prefix this is (a dict of prefixes), with probability ``p`` on it; ``wrong`` maps a
    (pair, answer token index) to a wrong token placed there instead."""

    def __init__(self, qa, vocab, p=0.9, wrong=()):
        self.next, self.vocab, self.p = {}, vocab, p
        wrong = dict(wrong)
        for i in range(len(qa)):
            row = qa.tokens[i][qa.tokens[i] != PAD_ID]
            value = np.flatnonzero(qa.answer[i])
            for t in range(1, len(row)):
                token = int(row[t])
                k = t - int(value[0]) if t >= value[0] else None
                self.next[tuple(row[:t].tolist())] = wrong.get((i, k), token)

    def __call__(self, x):
        out = torch.full((*x.shape, self.vocab), math.log((1 - self.p) / (self.vocab - 1)))
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                token = self.next.get(tuple(x[b, :t + 1].tolist()))
                if token is not None:
                    out[b, t, token] = math.log(self.p)
        return out


def test_batches_hold_eos_prompt_value_and_period(qa):
    ds, enc = qa
    assert len(enc) == 12 * 6 and enc.tokens.shape[1] == enc.answer.shape[1]
    assert (enc.tokens[:, 0] == EOS_ID).all()
    for i in (0, 7, 40):
        pair = qa_pairs(ds, [int(enc.person[i])], [ATTRS[enc.attribute[i]]])[0]
        assert ds.tokenizer.decode(enc.tokens[i][enc.answer[i]]) == " " + pair.answer
        assert ds.tokenizer.decode([enc.tokens[i, enc.end[i]]]) == "."
        assert ds.tokenizer.decode(enc.tokens[i, 1:enc.end[i] + 1]) == pair.text
        assert (enc.tokens[i, enc.end[i] + 1:] == PAD_ID).all()


def test_scores_agree_with_real_greedy_decoding(qa):
    ds, enc = qa
    vocab = ds.tokenizer.vocab_size
    # pair 0 wrong at the value's first token, 5 at its second, 9 at the closing period
    end_index = {i: int(enc.end[i] - np.flatnonzero(enc.answer[i])[0]) for i in (9,)}
    wrong = {(0, 0): 5, (5, 1): 6, (9, end_index[9]): 7}
    model = LookupModel(enc, vocab, wrong=wrong)
    scores = score_answers(model, enc, batch_size=5)
    for i in range(len(enc)):
        value = np.flatnonzero(enc.answer[i])
        prompt = enc.tokens[i, :value[0]].tolist()
        target = enc.tokens[i, value[0]:enc.end[i] + 1].tolist()
        got = greedy_answer(model, prompt, len(target) + 2, stop_id=int(enc.tokens[i, enc.end[i]]))
        assert scores.exact[i] == (got == target), i
        assert scores.first[i] == (got[0] == target[0]), i
    assert not scores.exact[[0, 5, 9]].any() and scores.exact.sum() == len(enc) - 3
    assert not scores.first[0] and scores.first[5] and scores.first[9]


def test_answer_loss_sums_the_value_tokens_only(qa):
    ds, enc = qa
    vocab, p = ds.tokenizer.vocab_size, 0.75
    scores = score_answers(LookupModel(enc, vocab, p=p), enc, batch_size=64)
    assert np.allclose(scores.loss, -math.log(p) * enc.answer.sum(axis=1), rtol=1e-5)


def test_qa_loss_is_the_mean_over_target_positions():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    targets = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.bool)
    logp = torch.log_softmax(logits, -1)
    expected = -torch.stack([logp[0, 1, tokens[0, 2]], logp[0, 2, tokens[0, 3]],
                             logp[1, 0, tokens[1, 1]], logp[1, 3, tokens[1, 4]]]).mean()
    assert torch.allclose(qa_loss(logits, tokens, targets), expected)
