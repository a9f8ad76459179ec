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

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
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
