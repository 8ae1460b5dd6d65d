"""qa_report.json: what the test half's answers say, and the extractable bits.

Extractable bits are the capacity formula of kcap.capacity on the test half with p2's terms
replaced: each attribute that has a question (all but the gender) contributes the summed
loss (nats) of its answer's value tokens after "question Answer:", instead of its loss inside
the biography. The name term (p1) and the gender term, which no question asks, keep their
biography losses, so stored and extractable bits differ only where a question can tell. A
question asks for one attribute at a time, so the work city (counted in the employer's term
where a biography names it first) is never counted: the employer's answer is its own loss.
Both figures are estimates for all N people from the same test sample (with its 95%
interval); their ratio is the "loss" Part 3.3's appendix quotes (about 1.2x at the capacity
boundary).
"""
from __future__ import annotations

import math

import numpy as np

from kcap.capacity import Z95, PersonLosses, capacity_report

DEFINITION = ("extractable bits: the capacity formula on the test half with each questioned "
              "attribute's biography loss replaced by its QA answer loss (value tokens after "
              "'question Answer:'); name and gender keep their biography losses; the work city "
              "is not counted")


def wilson(successes: int, total: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion."""
    if total < 1:
        return (0.0, 1.0)
    p, z2 = successes / total, Z95 * Z95
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = Z95 * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def qa_person_losses(ds, stored: PersonLosses, qa, scores) -> PersonLosses:
    """``stored`` with each questioned attribute's value loss (and greedy verdicts) replaced
    by the QA answer's; positions in attribute order (no chain rule: one question each)."""
    names = [a.name for a in ds.attributes]
    row = np.searchsorted(stored.persons, qa.person)
    if not np.array_equal(stored.persons[np.minimum(row, len(stored.persons) - 1)], qa.person):
        raise ValueError("the QA pairs ask about people the biography evaluation did not cover")
    col = np.array([names.index(qa.attributes[a]) for a in qa.attribute], np.int64)
    value = stored.value.copy()
    value[row, col] = scores.loss
    exact, first = stored.value_correct.copy(), stored.first_correct.copy()
    exact[row, col], first[row, col] = scores.exact, scores.first
    position = np.broadcast_to(np.arange(len(names), dtype=np.int64), value.shape).copy()
    return PersonLosses(stored.persons, stored.name, value, value, first, exact, position=position)


def build_report(ds, stored: PersonLosses, qa, scores, seen, seen_scores, n_params: int) -> dict:
    """The report's content: per-attribute accuracy with 95% intervals on the test half (and
    on a sample of the fine-tuning half, to tell what was fitted from what generalises),
    stored and extractable bits, and their ratio."""
    stored_report = capacity_report(ds, stored, n_params)
    extract_report = capacity_report(ds, qa_person_losses(ds, stored, qa, scores), n_params)
    by_name = {a.name: a for a in ds.attributes}
    names = [a.name for a in ds.attributes]
    attributes = {}
    for i, name in enumerate(qa.attributes):
        mine, theirs = qa.attribute == i, seen.attribute == i
        hits, total = int(scores.exact[mine].sum()), int(mine.sum())
        attributes[name] = {
            "exact_match": hits / max(total, 1), "exact_match_ci95": wilson(hits, total),
            "first_token": float(scores.first[mine].mean()) if total else 0.0,
            "answer_loss": float(scores.loss[mine].mean()) if total else 0.0,
            "biography_loss": float(stored.value[:, names.index(name)].mean()),
            "chance": 1.0 / by_name[name].cardinality, "questions": total,
            "fine_tune_half_exact_match": float(seen_scores.exact[theirs].mean())
            if theirs.any() else None}
    stored_bits, extract_bits = stored_report.bits, extract_report.bits
    return {
        "definition": DEFINITION,
        "exact_match": float(scores.exact.mean()),
        "exact_match_ci95": wilson(int(scores.exact.sum()), len(scores.exact)),
        "first_token": float(scores.first.mean()),
        "fine_tune_half_exact_match": float(seen_scores.exact.mean()) if len(seen_scores.exact) else None,
        "attributes": attributes,
        "stored_bits": stored_bits, "stored_value_bits": stored_report.value_bits,
        "extractable_bits": extract_bits, "extractable_value_bits": extract_report.value_bits,
        "extractable_bits_ci95": extract_report.bits_ci95,
        "stored_over_extractable": stored_bits / extract_bits if extract_bits > 0 else None,
        "R_stored": stored_report.R, "R_extractable": extract_report.R, "R_max": stored_report.R_max,
        "stored": stored_report.to_dict(), "extractable": extract_report.to_dict(),
    }


def summary_lines(report: dict) -> list[str]:
    """A few lines for the terminal: accuracy per attribute, then the bits."""
    lo, hi = report["exact_match_ci95"]
    lines = [f"QA on {report['people']['tested']:,} held-out people: exact match "
             f"{report['exact_match']:.1%} [{lo:.1%}, {hi:.1%}], first token "
             f"{report['first_token']:.1%} (fine-tuning half: "
             f"{report['fine_tune_half_exact_match']:.1%})"]
    for name, a in report["attributes"].items():
        lo, hi = a["exact_match_ci95"]
        lines.append(f"  {name:<11} exact {a['exact_match']:6.1%} [{lo:.1%}, {hi:.1%}]  first token "
                     f"{a['first_token']:6.1%}  chance {a['chance']:.2%}")
    ratio = report["stored_over_extractable"]
    lines.append(f"stored {report['stored_bits']:,.0f} bits (R {report['R_stored']:.3f}), "
                 f"extractable {report['extractable_bits']:,.0f} bits (R {report['R_extractable']:.3f})"
                 + (f": stored / extractable = {ratio:.2f}x" if ratio else
                    ": nothing extractable yet (extractable bits <= 0)"))
    return lines
