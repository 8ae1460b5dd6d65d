"""QA pairs as token batches, and what a model answers to them.

Each pair is one sequence: EOS (a document starts after one, as in pretraining), the
prompt "question Answer:", the answer's value tokens, then the period that ends the answer.
Sequences are right-padded: a causal model's outputs at a position never see what follows,
so padding changes nothing before it.

Scoring is teacher-forced, in one forward pass per batch, and is still greedy generation's
exact verdict: greedy decoding writes the answer and its period exactly when, at every one
of those positions, the argmax given the true prefix is the true token (the first position
where it is not is where greedy decoding leaves the answer). ``greedy_answer`` generates for
real; tests hold the two together.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from kcap.data.qa import encode_qa
from kcap.data.tokenizer import EOS_ID, PAD_ID


@dataclass
class QATokens:
    """Encoded QA pairs: ``tokens`` (P, T) int64 right-padded with PAD_ID; ``answer`` (P, T)
    bool, the value tokens; ``end`` (P,) int64, the index of the period closing the answer;
    ``attribute`` (P,) int64 (index into ``attributes``) and ``person`` (P,) int64."""
    tokens: np.ndarray
    answer: np.ndarray
    end: np.ndarray
    attribute: np.ndarray
    person: np.ndarray
    attributes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, index) -> "QATokens":
        """The pairs at ``index``, trimmed to their longest sequence."""
        tokens, answer = self.tokens[index], self.answer[index]
        width = int((tokens != PAD_ID).sum(axis=1).max(initial=1))
        return QATokens(tokens[:, :width], answer[:, :width], self.end[index],
                        self.attribute[index], self.person[index], self.attributes)

    def targets(self) -> np.ndarray:
        """(P, T) bool: the positions trained on, the value tokens and the closing period."""
        out = self.answer.copy()
        out[np.arange(len(out)), self.end] = True
        return out


def encode_pairs(tokenizer, pairs, attributes) -> QATokens:
    """QATokens of ``pairs`` (kcap.data.qa.QAPair); ``attributes`` names the index order."""
    attributes = tuple(attributes)
    encoded = [encode_qa(tokenizer, p) for p in pairs]
    width = 1 + max((len(ids) for ids, _ in encoded), default=1)
    tokens = np.full((len(pairs), width), PAD_ID, np.int64)
    answer = np.zeros((len(pairs), width), bool)
    end = np.zeros(len(pairs), np.int64)
    for i, (ids, mask) in enumerate(encoded):
        tokens[i, 0] = EOS_ID
        tokens[i, 1:1 + len(ids)] = ids
        answer[i, 1:1 + len(ids)] = mask
        end[i] = len(ids)  # encode_qa ends with the period: index len(ids) after the EOS
    return QATokens(tokens, answer, end, np.array([attributes.index(p.attribute) for p in pairs],
                                                  np.int64),
                    np.array([p.person for p in pairs], np.int64), attributes)


def qa_loss(logits, tokens, targets):
    """Mean cross-entropy (nats) of the target positions: logits (B, T, V) float, tokens
    (B, T) int64, targets (B, T) bool (position t's token is predicted from t - 1)."""
    import torch

    picked = targets[:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1][picked].float(), tokens[:, 1:][picked])


@dataclass
class AnswerScores:
    """Per pair: ``loss`` (P,) float64, summed nats over the value tokens; ``exact`` (P,)
    bool, greedy decoding writes the value and its period; ``first`` (P,) bool, the
    value's first token is the argmax."""
    loss: np.ndarray
    exact: np.ndarray
    first: np.ndarray


def score_answers(model, qa: QATokens, batch_size: int = 64, device=None, progress: bool = False,
                  autocast=None) -> AnswerScores:
    """Teacher-forced answer losses and greedy verdicts of ``model`` (ids (B, T) -> logits
    (B, T, V)) on every pair of ``qa``."""
    import torch
    from tqdm.auto import tqdm

    from kcap.data.arguments import check_int

    check_int("batch_size", batch_size, 1)
    loss, exact, first = (np.zeros(len(qa)), np.zeros(len(qa), bool), np.zeros(len(qa), bool))
    targets = qa.targets()
    for lo in tqdm(range(0, len(qa), batch_size), desc="scoring answers", unit="batch",
                   disable=not progress, dynamic_ncols=True):
        rows = slice(lo, lo + batch_size)
        part = qa.rows(rows)
        x = torch.from_numpy(part.tokens).to(device)
        with torch.no_grad(), (autocast() if autocast else nullcontext()):
            logits = model(x)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, x[:, 1:, None])[..., 0].double().cpu().numpy()
        right = (logits[:, :-1].argmax(-1) == x[:, 1:]).cpu().numpy()
        value, scored = part.answer[:, 1:], targets[rows, 1:part.tokens.shape[1]]
        loss[rows] = (nll * value).sum(axis=1)
        exact[rows] = (right | ~scored).all(axis=1)
        first[rows] = right[np.arange(len(part)), value.argmax(axis=1)]
    return AnswerScores(loss, exact, first)


def greedy_answer(model, prompt_ids, max_new: int, stop_id: int, device=None) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (a list of ints) by ``model``, up to and
    including ``stop_id`` or ``max_new`` tokens (no cache: answers are a few tokens)."""
    import torch

    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([ids], dtype=torch.int64, device=device))
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == stop_id:
                break
    return out

