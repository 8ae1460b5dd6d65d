"""Evaluate any causal LM on a data set and report its bits of knowledge.

The model is any callable mapping token ids (B, T) int64 to logits (B, T, V). Each evaluated
person's biography (rendering ``exposure``, 0 by default: for online bioS every rendering is
drawn from the same distribution) is placed whole in a window right after an EOS, as in
training where a biography follows the previous one's EOS, so the name is predicted from the
same context the model learnt it in. Windows are padded; padding is never scored.
"""
from __future__ import annotations

import numpy as np

from kcap.capacity import CapacityReport, PersonLosses, capacity_report
from kcap.data import counter_rng as rng
from kcap.data.arguments import check_int
from kcap.data.labels import NAME, VALUE, TokenLabels
from kcap.data.tokenizer import EOS_ID, PAD_ID


def pack_whole(dataset, persons: np.ndarray, exposure: int, window: int):
    """Windows holding whole biographies, each after an EOS.

    Returns tokens (W, window) int64 and labels (W, window) TokenLabels.
    """
    r = dataset.render(persons, np.full(len(persons), exposure), labels=True)
    if r.lengths.max(initial=0) + 1 > window:
        raise ValueError(f"window ({window}) must exceed the longest biography "
                         f"({int(r.lengths.max())} tokens) by one for the leading EOS")
    starts = np.concatenate([[0], np.cumsum(r.lengths)])
    rows, row, used = [], [], 1
    for i, length in enumerate(r.lengths.tolist()):
        if used + length > window:
            rows.append(row)
            row, used = [], 1
        row.append(i)
        used += length
    rows.append(row)
    tokens = np.full((len(rows), window), PAD_ID, np.int64)
    labels = TokenLabels.padding(len(rows) * window).reshape(len(rows), window)
    tokens[:, 0] = EOS_ID
    for w, bios in enumerate(rows):
        lo, hi = starts[bios[0]], starts[bios[-1] + 1]
        tokens[w, 1:1 + hi - lo] = r.tokens[lo:hi]
        for dst, src in ((labels.field, r.labels.field), (labels.chunk, r.labels.chunk),
                         (labels.person, r.labels.person)):
            dst[w, 1:1 + hi - lo] = src[lo:hi]
    return tokens, labels


def sample_people(dataset, sample: int | None, seed: int) -> np.ndarray:
    """All people (sample None) or a seeded random sample of ``sample`` of them, sorted."""
    n = dataset.n_people
    if sample is None or sample >= n:
        return np.arange(n)
    check_int("sample", sample, 1)
    return np.sort(rng.permute(rng.stream_key(seed, "evaluate/sample"), n, np.arange(sample)))


def person_losses(model, dataset, persons: np.ndarray, batch_size: int = 8, window: int = 512,
                  exposure: int = 0, device=None, progress: bool = False) -> PersonLosses:
    """Summed per-person losses (nats) of ``model`` on the given people.

    Values of attributes with token ``classes`` (bioS's gender) are scored as the choice
    between classes in ``value`` and as their token in ``value_raw``; ``position`` records
    where each value starts, which the chain rule of kcap/capacity.py reads.
    """
    import torch
    from tqdm.auto import tqdm

    check_int("batch_size", batch_size, 1)
    tokens, labels = pack_whole(dataset, persons, exposure, window)
    n_attr = len(dataset.attributes)
    m = len(persons)
    name = np.zeros(m)
    value, raw, first = np.zeros(m * n_attr), np.zeros(m * n_attr), np.zeros(m * n_attr)
    first_right = np.zeros(m * n_attr)
    wrong = np.zeros(m * n_attr)
    no_position = np.iinfo(np.int64).max
    position = np.full(m * n_attr, no_position, np.int64)
    where = np.arange(tokens.size, dtype=np.int64).reshape(tokens.shape)[:, 1:]
    scorers = [(VALUE + a, _ClassChoice(attr.classes)) for a, attr in enumerate(dataset.attributes)
               if attr.classes]
    for lo in tqdm(range(0, len(tokens), batch_size), desc="evaluating", unit="batch",
                   disable=not progress):
        x = torch.from_numpy(tokens[lo:lo + batch_size])
        if device is not None:
            x = x.to(device)
        with torch.no_grad():
            logits = model(x)
        if logits.ndim != 3 or logits.shape[:2] != x.shape:
            raise ValueError(f"model must return logits of shape (B, T, V) for ids {tuple(x.shape)}, "
                             f"got {tuple(logits.shape)}")
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, x[:, 1:, None])[..., 0].cpu().double().numpy().ravel()
        right = (logits[:, :-1].argmax(-1) == x[:, 1:]).cpu().numpy().ravel()
        rows = labels.field[lo:lo + batch_size]
        starts = ((rows[:, 1:] != rows[:, :-1]) & (labels.chunk[lo:lo + batch_size, 1:] <= 0)).ravel()
        fld = labels.field[lo:lo + batch_size, 1:].ravel()
        slot = np.searchsorted(persons, labels.person[lo:lo + batch_size, 1:].ravel())
        chunk = labels.chunk[lo:lo + batch_size, 1:].ravel()
        is_name = fld == NAME
        name += np.bincount(slot[is_name], nll[is_name], minlength=m)
        is_value = fld >= VALUE
        idx = slot[is_value] * n_attr + (fld[is_value] - VALUE)
        raw += np.bincount(idx, nll[is_value], minlength=m * n_attr)
        scored = nll.copy()
        for field, choice in scorers:
            at = np.flatnonzero(fld == field)
            if at.size:
                scored[at] = choice.loss(logp.reshape(-1, logp.shape[-1]), x[:, 1:].reshape(-1), at)
        value += np.bincount(idx, scored[is_value], minlength=m * n_attr)
        np.minimum.at(position, idx, where[lo:lo + batch_size].ravel()[is_value])
        wrong += np.bincount(idx, ~right[is_value], minlength=m * n_attr)
        is_start = is_value & starts  # the first token of a value
        first_right += np.bincount(slot[is_start] * n_attr + (fld[is_start] - VALUE),
                                   right[is_start], minlength=m * n_attr)
        is_first = is_value & (chunk == 0)
        idx = slot[is_first] * n_attr + (fld[is_first] - VALUE)
        first += np.bincount(idx, scored[is_first], minlength=m * n_attr)
    shape = (m, n_attr)
    position[position == no_position] = -1
    return PersonLosses(persons, name, value.reshape(shape), first.reshape(shape),
                        first_right.reshape(shape) > 0, wrong.reshape(shape) == 0,
                        value_raw=raw.reshape(shape), position=position.reshape(shape))


class _ClassChoice:
    """Scores a one-token value as the choice between token classes (Attribute.classes)."""

    def __init__(self, classes):
        import torch

        self.ids = [torch.tensor(c, dtype=torch.int64) for c in classes]
        self.class_of = {t: c for c, ids in enumerate(classes) for t in ids}

    def loss(self, logp, targets, at: np.ndarray) -> np.ndarray:
        """-ln P(class of the target) / P(any class) at flat positions ``at``, float64 (k,).

        logp: (n, V) log-probabilities; targets: (n,) token ids."""
        import torch

        where = torch.from_numpy(at).to(logp.device)
        observed = targets[where].cpu().tolist()
        unknown = sorted({t for t in observed if t not in self.class_of})
        if unknown:
            raise ValueError(f"token ids {unknown} are labelled as a class-scored value but "
                             "belong to none of its classes")
        rows = logp[where]
        per_class = torch.stack([torch.logsumexp(rows[:, ids.to(rows.device)], dim=-1)
                                 for ids in self.ids], dim=-1)
        mine = torch.tensor([self.class_of[t] for t in observed], device=rows.device)
        out = torch.logsumexp(per_class, dim=-1) - per_class.gather(-1, mine[:, None])[:, 0]
        return out.cpu().double().numpy()


def evaluate_capacity(model, dataset, n_params: int, sample: int | None = None, seed: int = 0,
                      batch_size: int = 8, window: int = 512, exposure: int = 0, device=None,
                      progress: bool = False) -> CapacityReport:
    """Bits, R and R_max of ``model`` on ``dataset`` (all people, or a random ``sample``
    with a 95% interval). ``n_params``: the counted parameters (see capacity.count_params)."""
    persons = sample_people(dataset, sample, seed)
    losses = person_losses(model, dataset, persons, batch_size, window, exposure, device, progress)
    return capacity_report(dataset, losses, n_params)
