"""Dataclass fields checked against their type annotations, with the key in every message.

A config value of the wrong type must be refused, not used: ``tied = "false"`` in a TOML file
is a non-empty string, so ``if cfg.tied`` would take it as True and build another model than
the one asked for. ``check_fields`` (called from a config's ``__post_init__``) and
``check_mapping`` (for a dict of overrides) refuse such values and normalise the accepted
ones, so every later reader sees the annotated type:

  bool            True or False only (no strings, no 0/1)
  int             any integer but a bool, converted to int (numpy integers too)
  float           any real number but a bool, converted to float; must be finite
  str             a string
  X | None        None or an X
  tuple[T, T]     a tuple or list of exactly that many T (converted to a tuple);
                  tuple[T, ...] any length
  dict            any mapping (copied)
  a dataclass     an instance (re-validated and copied) or a mapping of its fields
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Mapping

_SINGULAR = {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string",
             dict: "a table (dict)"}
_PLURAL = {bool: "bools", int: "integers", float: "numbers", str: "strings"}


@functools.cache
def field_types(cls) -> dict[str, object]:
    """{field name: annotation} of a dataclass, string annotations evaluated."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def key_name(section: str, name: str) -> str:
    """How messages name a field: 'data.marker' in section 'data', 'lr' at the top."""
    return f"{section}.{name}" if section else name


def check_fields(instance, section: str = "") -> None:
    """Check every field of a dataclass ``instance`` and store its normalised value (frozen
    dataclasses too). TypeError for a wrong type, ValueError for a non-finite float."""
    for name, hint in field_types(type(instance)).items():
        value = check_value(key_name(section, name), getattr(instance, name), hint)
        object.__setattr__(instance, name, value)


def check_mapping(cls, values, section: str) -> dict:
    """``values`` ({field name: value}, some fields of dataclass ``cls``) checked and
    normalised into a new dict; unknown keys are a ValueError naming them."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{section} must be a table (dict), got {_shown(values, True)}")
    known = _known_fields(cls, values, section)
    return {k: check_value(key_name(section, k), v, known[k]) for k, v in values.items()}


def _known_fields(cls, values: Mapping, where: str) -> dict:
    """field_types(cls), after refusing any key of ``values`` that is not one of them."""
    known = field_types(cls)
    unknown = sorted((k for k in values if k not in known), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    return known


def check_value(key: str, value, hint):
    """``value`` normalised to annotation ``hint`` (see the module docstring), or a
    TypeError / ValueError whose message starts with ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(key, value, option)
            except TypeError:
                continue
        raise TypeError(f"{key} must be {describe(hint)}, got {_shown(value, True)}")
    if origin is tuple or hint is tuple:
        return _check_tuple(key, value, hint, args)
    if dataclasses.is_dataclass(hint):
        return _check_dataclass(key, value, hint)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    elif hint in (dict, str):
        ok = isinstance(value, Mapping if hint is dict else str)
    else:
        raise TypeError(f"{key}: annotation {hint!r} is not supported by the field checker")
    if not ok:
        raise TypeError(f"{key} must be {describe(hint)}, got {_shown(value, True)}")
    if hint is float:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {_shown(value, False)}")
        return value
    return {bool: bool, int: int, dict: dict, str: lambda s: s}[hint](value)


def describe(hint) -> str:
    """What an annotation accepts, in words: 'an integer or None', '2 numbers'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = [describe(a) for a in args if a is not type(None)]
        return " or ".join(words + (["None"] if type(None) in args else []))
    if origin is tuple or hint is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            element = args[0] if args else None
            return f"a list of {_PLURAL.get(element, 'values')}"
        if len(set(args)) == 1 and args[0] in _PLURAL:
            return f"{len(args)} {_PLURAL[args[0]]}"
        return f"a list of ({', '.join(describe(a) for a in args)})"
    if dataclasses.is_dataclass(hint):
        return f"a table of {hint.__name__} fields"
    return _SINGULAR.get(hint, str(hint))


def _check_tuple(key: str, value, hint, args) -> tuple:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{key} must be {describe(hint)}, got {_shown(value, False)}")
    if not args:
        return tuple(value)
    variadic = len(args) == 2 and args[1] is Ellipsis
    element_types = (args[0],) * len(value) if variadic else args
    if len(value) != len(element_types):
        raise TypeError(f"{key} must be {describe(hint)}, got {_shown(value, False)}")
    items = []
    for i, (item, element) in enumerate(zip(value, element_types)):
        try:
            items.append(check_value(f"{key}[{i}]", item, element))
        except TypeError:  # the whole list reads better than one element of it
            raise TypeError(f"{key} must be {describe(hint)}, got {_shown(value, False)}") from None
    return tuple(items)


def _check_dataclass(key: str, value, cls):
    if isinstance(value, cls):
        return dataclasses.replace(value)  # a copy, re-validated by its own __post_init__
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} must be {describe(cls)}, got {_shown(value, True)}")
    _known_fields(cls, value, key)
    return cls(**value)


def _shown(value, with_type: bool) -> str:
    """A value as messages show it: one line, at most ~80 characters."""
    text = repr(value).replace("\n", " ").replace("\r", " ")
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type(value).__name__} {text}" if with_type else text
