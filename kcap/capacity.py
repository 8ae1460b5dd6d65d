"""Bits of knowledge from a model's losses (spec section 3; Definitions 4.1 and 4.3).

Losses are natural-log cross-entropies **summed** over the tokens of a piece of knowledge:
p1 over the full name, p2 over a value (bioD: all C chunks), p3 over a value's first chunk
(bioD only), each averaged over people (and attributes). Summing makes the bits invariant to
how a value is split into tokens. Then, with P the counted parameters:

  bioS  R = [N log2(N0 / e^p1) + N log2(S0 / e^p2)] / P,     R_max = [N log2(N0/N) + N log2 S0] / P
  bioD  R = [N log2(N0 / e^p1) + N K log2(D^C / e^p2) + K D log2(T^L / (D e^p3))] / P
        R_max = [N log2(N0/N) + N K C log2 D + K D log2(T^L / D)] / P

The terms are reported separately as name, value and diversity bits. They are not clipped:
a term below zero means the model knows less than the uniform guess over the pools.

Two bioS readings depart from the letter of Definition 4.3, each because the letter measures
something other than the model's knowledge of the person (``METRIC_CONVENTION``; every report
names it and also gives the literal numbers in ``literal``):

- Gender: its token is a biography's first pronoun, whose form (He / His / him ...) the
  template chooses. Read literally its loss charges that choice too (~0.66 bits per person
  no model can remove, so R = R_max is unreachable). kcap scores the choice between the
  genders: -ln p(pronouns of the observed gender) / p(pronouns of either gender). This is
  the two-way choice between same-form pronouns (He/She, His/Her ...) summed over forms, so
  "her" (the female of both "his" and "him") needs no form to pair it with.
- Work city: it is a function of the employer, so it is not counted. But where its sentence
  precedes the employer's (half of online and permute renderings) it already reveals ~6.5
  bits of the employer, and the employer's own loss shrinks by as much: read literally, a
  guesser knowing only the pools and the employer-to-city map earns ~3.2 employer bits per
  person. kcap applies the chain rule: there the employer's term is -ln p(work city) -
  ln p(employer | work city). Where the employer comes first the work city stays excluded.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

LN2 = math.log(2.0)
Z95 = 1.959963984540054

PARAM_CONVENTION = ("P counts every parameter once (tied embedding/LM head once, all MoE "
                    "experts), excluding embedding and LM-head rows of tokens the data never "
                    "uses")


METRIC_CONVENTION = ("bioS gender scored as the choice between the genders' pronouns; the work "
                     "city's loss counted in the employer's term where it comes first (chain "
                     "rule); see kcap/capacity.py")
BIOD_CONVENTION = "bioD: Definition 4.1 as written"
BIOS_KINDS = ("bioS", "bioR")  # bioR: imported rewrites of bioS people, the same knowledge


def bios_bits(n: int, n0: int, log2_s0: float, p1: float, p2: float) -> tuple[float, float]:
    """(name bits, value bits) of bioS: N log2(N0/e^p1) and N log2(S0/e^p2)."""
    return n * (math.log2(n0) - p1 / LN2), n * (log2_s0 - p2 / LN2)


def bios_bits_max(n: int, n0: int, log2_s0: float) -> float:
    return n * math.log2(n0 / n) + n * log2_s0


def biod_bits(n, n0, k, c, d, l, t, p1, p2, p3) -> tuple[float, float, float]:  # noqa: E741
    """(name, value, diversity) bits of bioD, Definition 4.1."""
    name = n * (math.log2(n0) - p1 / LN2)
    value = n * k * (c * math.log2(d) - p2 / LN2)
    diversity = k * d * (l * math.log2(t) - math.log2(d) - p3 / LN2)
    return name, value, diversity


def biod_bits_max(n, n0, k, c, d, l, t) -> float:  # noqa: E741
    return n * math.log2(n0 / n) + n * k * c * math.log2(d) + k * d * (l * math.log2(t) - math.log2(d))


def data_bits_max(dataset) -> float:
    """R_max's numerator: the bits of knowledge the data set contains."""
    if dataset.kind in BIOS_KINDS:
        return bios_bits_max(dataset.n_people, dataset.n_names, log2_s0(dataset))
    c = dataset.config
    return biod_bits_max(c.n, dataset.n_names, c.k, c.c, c.d, c.l, c.t)


def log2_s0(dataset) -> float:
    """log2 of the number of value combinations of a bioS person (counted attributes)."""
    return sum(math.log2(a.cardinality) for a in dataset.attributes if a.counted)


@dataclass
class PersonLosses:
    """Summed losses (nats) per evaluated person: ``name`` (n,), ``value`` (n, A) summed over
    each attribute's tokens, ``first_chunk`` (n, A) (bioD; equal to value for bioS).
    Optional greedy accuracy (n, A) bools: ``first_correct`` (the value's first token is the
    argmax) and ``value_correct`` (every token of the value is).

    ``value`` scores class-valued attributes (gender) as the choice between classes;
    ``value_raw`` (n, A), if given, holds every value's plain token losses (the literal
    reading). ``position`` (n, A) int64: where each value starts in the evaluated text (any
    order-preserving index; -1 if absent), needed where an attribute is ``determined_by``
    another (bioS's work city)."""
    persons: np.ndarray
    name: np.ndarray
    value: np.ndarray
    first_chunk: np.ndarray
    first_correct: np.ndarray | None = None
    value_correct: np.ndarray | None = None
    value_raw: np.ndarray | None = None
    position: np.ndarray | None = None


@dataclass
class CapacityReport:
    data: str
    n_people: int
    n_evaluated: int
    n_params: int
    p1: float
    p2: float
    p3: float | None
    name_bits: float
    value_bits: float
    diversity_bits: float | None
    bits: float
    bits_max: float
    R: float
    R_max: float
    bits_ci95: float  # half-width of a 95% interval from sampling people (0 if all evaluated)
    R_ci95: float
    attribute_loss: dict = field(default_factory=dict)  # mean summed nats per attribute
    attribute_accuracy: dict = field(default_factory=dict)  # {attr: {first_token, value}}
    param_convention: str = PARAM_CONVENTION
    metric_convention: str = METRIC_CONVENTION
    # bioS under Definition 4.3 read literally (gender's token loss, work city never counted):
    # {p2, value_bits, bits, R, gender_token_loss, determined_first}; None where not measured.
    literal: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        ci = f" +- {self.R_ci95:.3f}" if self.bits_ci95 else ""
        div = f", diversity {self.diversity_bits:,.0f}" if self.diversity_bits is not None else ""
        return (f"{self.data}: {self.bits:,.0f} bits of {self.bits_max:,.0f} (name "
                f"{self.name_bits:,.0f}, value {self.value_bits:,.0f}{div}); P = {self.n_params:,}"
                f"; R = {self.R:.3f}{ci} bits/param, R_max = {self.R_max:.3f}; evaluated "
                f"{self.n_evaluated:,} of {self.n_people:,} people\n  [{self.param_convention}]"
                f"\n  [{self.metric_convention}" + (
                    f"; read literally R = {self.literal['R']:.3f}" if self.literal else "") + "]"
                + ("\n  [negative bits: the model's losses are still above a uniform guess over "
                   "the pools (an untrained or early model); the formula counts that as negative "
                   "knowledge]" if self.bits < 0 else ""))


def capacity_report(dataset, losses: PersonLosses, n_params: int) -> CapacityReport:
    """Turn per-person summed losses into bits, R and R_max with a 95% interval.

    The interval treats the evaluated people as a simple random sample without replacement
    (finite-population correction), on the per-person term that the bits are linear in.
    """
    if n_params < 1:
        raise ValueError(f"n_params must be >= 1, got {n_params}")
    n, m = dataset.n_people, len(losses.persons)
    if m < 1:
        raise ValueError("no people were evaluated")
    counted = np.array([a.counted for a in dataset.attributes])
    p1 = float(losses.name.mean())
    literal = None
    if dataset.kind in BIOS_KINDS:
        per_person, determined_first = _bios_value_term(dataset, losses, counted)
        p2, p3 = float(per_person.mean()), None
        name, value = bios_bits(n, dataset.n_names, log2_s0(dataset), p1, p2)
        diversity, total_max = None, data_bits_max(dataset)
        x = n * (losses.name + per_person)  # bits = const - mean(x) / ln 2
        convention = METRIC_CONVENTION
        if losses.value_raw is not None:
            p2_literal = float(losses.value_raw[:, counted].sum(axis=1).mean())
            value_literal = bios_bits(n, dataset.n_names, log2_s0(dataset), p1, p2_literal)[1]
            gender = [i for i, a in enumerate(dataset.attributes) if a.classes]
            literal = {"p2": p2_literal, "value_bits": value_literal,
                       "bits": name + value_literal, "R": (name + value_literal) / n_params,
                       "gender_token_loss": float(losses.value_raw[:, gender].sum(axis=1).mean())
                       if gender else None, "determined_first": determined_first}
    else:
        c = dataset.config
        p2, p3 = float(losses.value.mean()), float(losses.first_chunk.mean())
        name, value, diversity = biod_bits(n, dataset.n_names, c.k, c.c, c.d, c.l, c.t, p1, p2, p3)
        total_max = data_bits_max(dataset)
        x = (n * losses.name + n * c.k * losses.value.mean(axis=1)
             + c.k * c.d * losses.first_chunk.mean(axis=1))
        convention = BIOD_CONVENTION
    bits = name + value + (diversity or 0.0)
    half = 0.0
    if m < n and m > 1:
        se = x.std(ddof=1) / math.sqrt(m) * math.sqrt(1.0 - m / n)
        half = Z95 * se / LN2
    return CapacityReport(
        data=dataset.kind, n_people=n, n_evaluated=m, n_params=int(n_params), p1=p1, p2=p2,
        p3=p3, name_bits=name, value_bits=value, diversity_bits=diversity, bits=bits,
        bits_max=total_max, R=bits / n_params, R_max=total_max / n_params, bits_ci95=half,
        R_ci95=half / n_params,
        attribute_loss={a.name: float(losses.value[:, i].mean())
                        for i, a in enumerate(dataset.attributes)},
        attribute_accuracy={} if losses.value_correct is None else {
            a.name: {"first_token": float(losses.first_correct[:, i].mean()),
                     "value": float(losses.value_correct[:, i].mean())}
            for i, a in enumerate(dataset.attributes)},
        metric_convention=convention, literal=literal)


def _bios_value_term(dataset, losses: PersonLosses, counted: np.ndarray):
    """Per-person value loss (n,) of the counted attributes with the chain rule applied,
    and the share of people for whom a determined attribute came first."""
    term = losses.value[:, counted].sum(axis=1)
    names = [a.name for a in dataset.attributes]
    shares = {}
    for a, attr in enumerate(dataset.attributes):
        if attr.determined_by is None:
            continue
        if losses.position is None:
            raise ValueError(f"losses.position is needed: {attr.name} is determined by "
                             f"{attr.determined_by}, and which comes first decides what counts")
        b = names.index(attr.determined_by)
        pos = losses.position
        first = (pos[:, a] >= 0) & (pos[:, a] < pos[:, b])
        term = term + np.where(first, losses.value[:, a], 0.0)
        shares[attr.name] = float(first.mean())
    return term, shares


def count_params(model, used_token_ids, vocab_size: int) -> int:
    """Parameters counted for capacity: each tensor once (tied weights shared), with the rows
    of vocabulary-indexed tensors (nn.Embedding weights, LM-head Linear weight and bias with
    ``vocab_size`` outputs) limited to ``used_token_ids``."""
    import torch.nn as nn

    used = np.unique(np.asarray(used_token_ids, dtype=np.int64))
    if used.size and (used[0] < 0 or used[-1] >= vocab_size):
        raise ValueError(f"used_token_ids must lie in [0, {vocab_size})")
    seen, counted = set(), 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            by_vocab = (isinstance(module, nn.Embedding) and module.num_embeddings == vocab_size) or (
                isinstance(module, nn.Linear) and module.out_features == vocab_size)
            if by_vocab and p.shape[0] == vocab_size:
                counted += len(used) * (p.numel() // vocab_size)
            else:
                counted += p.numel()
    return counted
