"""What a setting may be, declared beside the settings object's field that holds it.

A field of a settings object (``recipes.experiment.CorpusSettings``, ``AudioSettings``,
``SamplingSettings``, ``ModelWiring``, ``recipes.evaluation.verification.ScoringSettings``) names
its rule in its metadata, ``field(metadata=rule(Range(1, integer=True)))``: a ``Range``, a
``Choice`` of a registry (the code that dispatches on the setting keeps its choices, read when
checking, so a choice added there is allowed with no second list), a ``ListOf`` such a registry,
``BOOLEAN`` or ``PATH``. The field's name is its YAML key. ``recipes/settings.py`` gathers these
(``declared_rules``) with the rules of the keys no settings object holds (training's) and checks a
YAML's values by key before HyperPyYAML builds anything.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple


class Range(NamedTuple):
    """Allowed values of a number: ``low`` / ``high`` (None: unbounded), each excluded or not."""

    low: float | None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        """The range in words, e.g. "a whole number >= 1", "a number in (0, 1]"."""
        kind = "a whole number" if self.integer else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{kind} in {left}{self.low}, {self.high}{right}"

    def holds(self, value) -> bool:
        """Whether ``value`` is of the range's kind and inside it (a bool is no number)."""
        kinds = int if self.integer else int | float
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


class Choice(NamedTuple):
    """One of a registry's entries (a tuple, or a dict's keys, read when checking)."""

    registry: tuple | dict


class ListOf(NamedTuple):
    """A list of distinct entries of a registry (a tuple, or a dict's keys)."""

    registry: tuple | dict


#: A setting that is true or false, and nothing else (YAML reads ``no`` as a string).
BOOLEAN = "true or false"
#: A path, read as it is.
PATH = "a path"


def rule(check) -> dict:
    """A field's metadata declaring its setting's ``check``."""
    return {"check": check}


def declared_rules(*classes) -> dict:
    """``{key: check}`` of every field of the dataclasses ``classes`` that declares a rule.

    A key held by several settings objects is declared once (the others declare nothing).
    """
    rules = {}
    for cls in classes:
        for field in dataclasses.fields(cls):
            if "check" not in field.metadata:
                continue
            if field.name in rules:
                raise ValueError(f"{field.name}: its rule is declared twice ({cls.__name__})")
            rules[field.name] = field.metadata["check"]
    return rules
