"""Every module, class and function of the recipe has a docstring, nested functions included.

ruff's pydocstyle rules skip nested functions; SpeechBrain's own recipe check
(``tests/utils/check_docstrings.py`` in its repository) does not, so neither does this. Special
methods (``__init__``, ``__len__``, ...) are documented by their class's docstring, as in
SpeechBrain and as ``pyproject.toml`` tells ruff (D105, D107).
"""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

SOURCES = sorted(
    path
    for folder in ("recipes", "data_prep")
    for path in (ROOT / folder).rglob("*.py")
    if path.name != "__init__.py"
)


def undocumented(tree: ast.Module) -> list[str]:
    """``name (line N)`` of every class or function in ``tree`` without a docstring."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [
        f"{node.name} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, kinds)
        and ast.get_docstring(node) is None
        and not (node.name.startswith("__") and node.name.endswith("__"))
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_definition_has_a_docstring(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{path}: no module docstring"
    assert undocumented(tree) == []


def test_the_check_sees_nested_functions():
    source = '"""M."""\ndef outer():\n    """O."""\n    def inner():\n        pass\n'
    assert undocumented(ast.parse(source)) == ["inner (line 4)"]
    dunder = '"""M."""\nclass A:\n    """A."""\n    def __init__(self):\n        pass\n'
    assert undocumented(ast.parse(dunder)) == []
