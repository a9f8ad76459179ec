"""``tests/recipes/DeepMine.csv``: the recipe's rows in SpeechBrain's recipe-test format, run.

SpeechBrain's CI lists every recipe's scripts in ``tests/recipes/<Dataset>.csv`` and runs each
row as ``python SCRIPT HPARAMS FLAGS --debug --debug_persistently`` (its
``tests/utils/recipe_tests.py``), then checks that the files of ``test_debug_checks`` exist in
the row's output folder. This runs our rows the same way, in order (the export and the
verification rows use the training row's output folder), with SpeechBrain's ``tests/tmp/``
placed in pytest's temporary folder. The hub's WavLM Base+ that ``wavlm_td.yaml`` names is served
offline from a local Hugging Face cache holding a tiny random WavLM under that id.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ruamel.yaml
from speechbrain.core import RunOptions
from transformers import WavLMConfig

from recipes.tiny_wavlm import TINY, save_to_hub_cache
from tests.helpers import ROOT

CSV = ROOT / "tests" / "recipes" / "DeepMine.csv"
#: SpeechBrain's columns (its tests/recipes/*.csv).
COLUMNS = [
    "Task", "Dataset", "Script_file", "Hparam_file", "Data_prep_file", "Readme_file",
    "Result_url", "HF_repo", "test_debug_flags", "test_debug_checks", "performance",
]  # fmt: skip


def rows() -> list[dict]:
    """The CSV's rows, in order."""
    with open(CSV, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_rows_are_in_speechbrains_format_and_cover_every_hparams_file():
    with open(CSV, encoding="utf-8", newline="") as handle:
        assert next(csv.reader(handle)) == COLUMNS
    table = rows()
    assert {row["Hparam_file"] for row in table} == {
        str(p.relative_to(ROOT)) for p in (ROOT / "hparams").glob("*.yaml")
    }
    for row in table:
        for column in ("Script_file", "Hparam_file", "Data_prep_file", "Readme_file"):
            assert (ROOT / row[column]).is_file(), (column, row[column])
        assert row["test_debug_flags"] and row["test_debug_checks"].startswith("file_exists=[")
        assert "--output_folder=" in row["test_debug_flags"]


def top_level_keys(hparams_file: Path) -> list[str]:
    """The top-level keys of a HyperPyYAML file (parsed as YAML, tags kept as they are)."""
    return list(ruamel.yaml.YAML(typ="rt").load(hparams_file.read_text(encoding="utf-8")))


def referenced_keys(hparams_file: Path) -> set[str]:
    """The keys that the file's own references (``!ref <key>``, ``<key[item]>``) read."""
    return set(re.findall(r"<([A-Za-z_]\w*)", hparams_file.read_text(encoding="utf-8")))


def keys_read_by(script: Path) -> set[str]:
    """The settings a script reads by name, found in its syntax tree.

    What SpeechBrain's ``check_yaml_vs_script`` counts (it matches text): ``x["key"]``,
    ``hparams.get("key")``, ``getattr(self.hparams, "key")``, ``hparams.key`` and
    ``self.hparams.key``. Not ``step.get("key")``: that rule reads ``hparams.get`` alone.
    """
    read = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            read.add(node.slice.value)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "get" and _is_hparams(func.value):
                read.add(node.args[0].value)
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            key = node.args[1]
            getter = isinstance(node.func, ast.Name) and node.func.id == "getattr"
            if getter and _is_hparams(node.args[0]) and isinstance(key, ast.Constant):
                read.add(key.value)
        if isinstance(node, ast.Attribute) and _is_hparams(node.value):
            read.add(node.attr)
    return {key for key in read if isinstance(key, str)}


def _is_hparams(node) -> bool:
    """Whether ``node`` is ``hparams`` or ``<something>.hparams``."""
    return (isinstance(node, ast.Name) and node.id == "hparams") or (
        isinstance(node, ast.Attribute) and node.attr == "hparams"
    )


#: Settings that SpeechBrain's Brain reads from ``hparams`` itself (its run options).
BRAIN_OPTIONS = {field.name for field in dataclasses.fields(RunOptions)}


def unread_keys(hparams_file: Path, script: Path) -> list[str]:
    """Top-level keys of ``hparams_file`` that nothing reads.

    Read: by the file's own references, as the Brain's run options, by name in ``script``; and
    ``__name`` keys are built for their effect (SpeechBrain's convention).
    """
    read = referenced_keys(hparams_file) | BRAIN_OPTIONS | keys_read_by(script)
    return [k for k in top_level_keys(hparams_file) if k not in read and not k.startswith("__")]


@pytest.mark.parametrize("row", rows(), ids=lambda r: f"{r['Script_file']}:{r['Hparam_file']}")
def test_every_key_of_a_yaml_is_read_by_the_script_it_is_passed_to(row):
    """The rule of SpeechBrain's ``check_yaml_vs_script``, checked on the syntax tree."""
    assert unread_keys(ROOT / row["Hparam_file"], ROOT / row["Script_file"]) == []


def test_an_unread_key_is_found(tmp_path):
    """The check above can fail: a key that only a module reads, or that nothing reads."""
    yaml = tmp_path / "h.yaml"
    yaml.write_text("lr: 0.1\nopt: !name:torch.optim.Adam {lr: !ref <lr>}\ncrop: 2\nloss: 1\n")
    script = tmp_path / "train.py"
    script.write_text(
        "def f(hparams, self):\n"
        "    hparams['opt'](); self.hparams.loss\n"
        "    settings(hparams)  # crop is read in there, not here\n"
        "    print('crop')\n"
    )
    assert unread_keys(yaml, script) == ["crop"]
    script.write_text(script.read_text() + "    x = step.get('crop', 1)\n")
    assert unread_keys(yaml, script) == ["crop"]  # SpeechBrain's rule reads hparams.get only
    script.write_text(script.read_text() + "    x = hparams.get('crop', 1)\n")
    assert unread_keys(yaml, script) == []


def expected_files(check: str) -> list[str]:
    """The files of a ``file_exists=[a,b,...]`` check."""
    return re.search(r"file_exists=\[(.*?)\]", check).group(1).split(",")


def run_rows(csv_path: Path, root: Path, tmp: Path, corpus: Path) -> None:
    """Run every row of ``csv_path`` from ``root`` as SpeechBrain's recipe tests do; check files.

    ``tests/tmp/`` of the flags becomes ``tmp``; the synthetic corpus is ``corpus`` (made with the
    rows' options); ``microsoft/wavlm-base-plus`` comes from a local Hugging Face cache.
    """
    (tmp / "DeepMine_synthetic").symlink_to(corpus)
    cache = tmp / "hf_cache"
    save_to_hub_cache(
        cache, "microsoft/wavlm-base-plus", WavLMConfig(**{**TINY, "mask_time_prob": 0.05}),
        do_normalize=False,
    )  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    with open(csv_path, encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle))
    for number, row in enumerate(table, start=2):  # SpeechBrain's recipe ids count from row 2
        flags = row["test_debug_flags"].replace("tests/tmp/", f"{tmp}/")
        command = (
            f"{shlex.quote(sys.executable)} {row['Script_file']} {row['Hparam_file']} {flags} "
            "--debug --debug_persistently"
        )
        env["PYTHONPATH"] = str(root / os.path.dirname(row["Script_file"]))  # as SpeechBrain
        result = subprocess.run(
            command, shell=True, capture_output=True, text=True, cwd=root, env=env, timeout=900
        )
        assert result.returncode == 0, (number, result.stdout[-2000:], result.stderr[-4000:])
        output = re.search(r"--output_folder=(\S+)", flags).group(1)
        missing = [
            name for name in expected_files(row["test_debug_checks"])
            if not os.path.exists(os.path.join(output, name))
        ]  # fmt: skip
        assert missing == [], (number, row["Script_file"], row["Hparam_file"])


@pytest.mark.slow
def test_every_row_runs_with_its_debug_flags_and_writes_its_files(tmp_path, tiny_corpus):
    run_rows(CSV, ROOT, tmp_path, tiny_corpus)


@pytest.mark.slow
def test_the_upstream_tree_runs_its_rows_in_a_speechbrain_layout(tmp_path, tiny_corpus):
    """``recipes/upstream_tree.py``'s tree, alone (this repository off the path), runs its rows."""
    tree = tmp_path / "speechbrain"
    subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "upstream_tree.py"), str(tree)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    recipe = tree / "recipes" / "DeepMine" / "SpeakerRec"
    sources = "".join(path.read_text() for path in recipe.rglob("*.py"))
    assert not re.search(r"(from|import) recipes\b", sources)  # this repository's package
    (tmp_path / "tmp").mkdir()
    run_rows(tree / "tests" / "recipes" / "DeepMine.csv", tree, tmp_path / "tmp", tiny_corpus)
    assert (tmp_path / "tmp" / "DeepMine_demo" / "export" / "tdsv_speaker_model.py").is_file()
