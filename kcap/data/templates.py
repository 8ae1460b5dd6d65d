"""Sentence templates of bioS and the QA questions, read from ``templates/``.

A template is one sentence about one attribute. It starts with ``{subj}`` or ``{poss}`` (the
person comes first, so in the first sentence the name precedes every value), holds
``{value}`` once after a space and before punctuation (so a value always tokenizes the same
way, whatever its template), and may use ``{he}``, ``{his}``, ``{him}`` inside.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "work_city")
PLACEHOLDER_RE = re.compile(r"\{(subj|poss|he|his|him|value)\}")
_VALUE_RULE = re.compile(r"(^|.* )\{value\}([.,].*)$")


def _read(name: str) -> list[str]:
    text = resources.files("kcap.data").joinpath("templates").joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def check_template(template: str) -> None:
    """Raise ValueError if a template breaks the rules the renderer relies on."""
    if not template.startswith(("{subj} ", "{poss} ")):
        raise ValueError(f"template must start with '{{subj}} ' or '{{poss}} ': {template!r}")
    if template.count("{value}") != 1 or not _VALUE_RULE.match(template):
        raise ValueError(f"template needs one ' {{value}}' followed by '.' or ',': {template!r}")
    if "{" in PLACEHOLDER_RE.sub("", template) or "}" in PLACEHOLDER_RE.sub("", template):
        raise ValueError(f"template has an unknown placeholder: {template!r}")
    if not template.endswith(".") or not template.isascii():
        raise ValueError(f"template must be ASCII and end with '.': {template!r}")


@functools.lru_cache(maxsize=1)
def load_templates() -> dict[str, tuple[str, ...]]:
    """attribute -> its templates, each checked."""
    out = {}
    for attr in ATTRIBUTES:
        lines = _read(f"{attr}.txt")
        for line in lines:
            check_template(line)
        if len(set(lines)) != len(lines):
            raise ValueError(f"templates/{attr}.txt has duplicate lines")
        out[attr] = tuple(lines)
    return out


@functools.lru_cache(maxsize=1)
def load_questions() -> dict[str, str]:
    """attribute -> question with a ``{name}`` placeholder."""
    rows = [line.split("\t") for line in _read("questions.txt")]
    questions = {attr: q for attr, q in rows}
    if tuple(questions) != ATTRIBUTES or any(q.count("{name}") != 1 for q in questions.values()):
        raise ValueError("templates/questions.txt: one '{name}' question per attribute, in order")
    return questions
