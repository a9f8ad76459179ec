"""The source's layers: no module imports one of a higher layer (docs/design.md section 1).

The layers, lowest first: the corpus and the model's pieces; training's pieces and the ONNX
export; the experiment (data and the assembled model); evaluation; the settings and the start
of a run (``init_from``); the entry scripts and tools. An import may stay in its layer or go
down, never up: a registry, a helper or a constant that a lower module needs lives below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

#: Path prefixes (from the repository's root) of each layer, lowest first.
LAYERS = (
    ("data_prep/", "recipes/model/", "recipes/disk.py", "recipes/distributed.py",
     "recipes/experiment_lock.py", "recipes/tiny_wavlm.py", "recipes/setting_rules.py",
     "recipes/__init__.py"),
    ("recipes/training/", "recipes/onnx_export.py"),
    ("recipes/experiment.py",),
    ("recipes/evaluation/",),
    ("recipes/settings.py", "recipes/init_from.py"),
    ("recipes/train_speaker_embeddings.py", "recipes/verify_speakers.py",
     "recipes/export_model.py", "recipes/onnx_trial_example.py", "recipes/upstream_tree.py"),
)  # fmt: skip


def layer_of(path: str) -> int:
    """The layer of a source file (its path from the root); a file of no layer fails."""
    for number, prefixes in enumerate(LAYERS):
        if path.startswith(prefixes):
            return number
    raise AssertionError(f"{path}: in no layer of tests/test_layers.py: place it")


def module_path(module: str) -> str | None:
    """The source file of one of this repository's modules (None for another package's)."""
    if not module.startswith(("recipes", "data_prep")):
        return None
    base = ROOT / Path(*module.split("."))
    if base.with_suffix(".py").is_file():
        return str(base.with_suffix(".py").relative_to(ROOT))
    return str((base / "__init__.py").relative_to(ROOT))


def imports_of(source: Path) -> set[str]:
    """The repository's modules that ``source`` imports (``from recipes import x`` gives x)."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    paths = {module_path(name) for name in found}
    return {p for p in paths if p is not None and (ROOT / p).is_file()}


def upward(path: str, targets) -> list[str]:
    """The imports of ``path`` (files ``targets``) that go to a higher layer, as ``a -> b``."""
    return [f"{path} -> {t}" for t in sorted(targets) if layer_of(t) > layer_of(path)]


def test_no_import_runs_to_a_higher_layer():
    sources = sorted((ROOT / "recipes").rglob("*.py")) + sorted((ROOT / "data_prep").rglob("*.py"))
    found = [upward(str(s.relative_to(ROOT)), imports_of(s)) for s in sources]
    assert [line for lines in found for line in lines] == []


def test_an_upward_import_is_found(tmp_path):
    """The check can fail: the import of the settings that resume_guard once made."""
    source = tmp_path / "resume_guard.py"
    source.write_text("from recipes.settings import WIRING\nfrom recipes import experiment\n")
    targets = imports_of(source)
    assert targets == {"recipes/__init__.py", "recipes/settings.py", "recipes/experiment.py"}
    assert upward("recipes/training/resume_guard.py", targets) == [
        "recipes/training/resume_guard.py -> recipes/experiment.py",
        "recipes/training/resume_guard.py -> recipes/settings.py",
    ]
