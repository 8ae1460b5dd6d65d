"""Sentence templates and questions: counts and the rules the renderer relies on."""
import pytest

from kcap.data import templates as T

TEMPLATES = T.load_templates()


def test_attributes_in_order():
    assert T.ATTRIBUTES == ("birth_date", "birth_city", "university", "major", "employer",
                            "work_city")
    assert tuple(TEMPLATES) == T.ATTRIBUTES


@pytest.mark.parametrize("attr", T.ATTRIBUTES)
def test_exactly_50_distinct_templates(attr):
    assert len(TEMPLATES[attr]) == 50
    assert len(set(TEMPLATES[attr])) == 50


@pytest.mark.parametrize("attr", T.ATTRIBUTES)
def test_check_template_accepts_every_shipped_template(attr):
    for t in TEMPLATES[attr]:
        T.check_template(t)  # must not raise
        assert t.startswith(("{subj} ", "{poss} ")) and t.endswith(".")
        assert t.count("{value}") == 1


def test_templates_differ_between_attributes():
    all_templates = [t for ts in TEMPLATES.values() for t in ts]
    assert len(set(all_templates)) == len(all_templates)


@pytest.mark.parametrize("good", [
    "{subj} was born on {value}.",
    "{poss} birthplace is {value}.",
    "{subj} moved, and {his} home was {value}, said {him}.",
    "{subj} said {he} worked at {value}.",
])
def test_check_template_accepts_hand_made_good(good):
    T.check_template(good)


@pytest.mark.parametrize("bad", [
    "He was born on {value}.",                  # no subject at the start
    "{value} is where {subj} was born.",        # value first, no subject at the start
    " {subj} was born on {value}.",             # leading space
    "{subj}was born on {value}.",               # subject not followed by a space
    "{subj} was born on.",                      # value missing
    "{subj} was born on {value} or {value}.",   # value twice
    "{subj} was born on {value}x.",             # value followed by a letter
    "{subj} was born on {value} today.",        # value followed by a space
    "{subj} was born on the{value}.",           # value not after a space
    "{subj} was born on {value}",               # no final period
    "{subj} was born on {value}, yes!",         # does not end with a period
    "{subj} was born on {value}, {her}.",       # unknown placeholder
    "{subj} was born on {value}, {name}.",      # placeholder of questions only
    "{subj} was born on {value}, {x.",          # stray brace
    "{subj} was born on {value}, x}.",          # stray closing brace
    "{subj} was born on {value}, caf\u00e9.",   # not ASCII
])
def test_check_template_rejects_hand_made_bad(bad):
    with pytest.raises(ValueError):
        T.check_template(bad)


def test_questions_one_per_attribute_with_name():
    q = T.load_questions()
    assert tuple(q) == T.ATTRIBUTES
    for text in q.values():
        assert text.count("{name}") == 1
        assert T.PLACEHOLDER_RE.search(text) is None


def test_loaders_are_cached():
    assert T.load_templates() is TEMPLATES
    assert T.load_questions() is T.load_questions()
