"""The recipe on the TdSV 2024 release's form, end to end: both official lists scored and answered.

The tiny synthetic corpus with its lists in TdSV 2024's form (a dev and an eval pair, six-column
enrollment lines, the keys outside ``docs/``, as the challenge kept them): the main command
trains on it, scores the validation split and both official lists, and writes for each list an
answer file in its trial order and a zip of it alone. Scored against the kept keys, as a
leaderboard would, the answer files give the run's own reports.
"""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from data_prep.manifests import read_list
from data_prep.synth_deepmine import synthesize_corpus
from recipes.evaluation.submission import score_answer
from tests.conftest import TINY
from tests.helpers import run_script


@pytest.fixture(scope="module")
def tdsv2024_corpus(tmp_path_factory, tiny_corpus):
    """The tiny corpus's audio with TdSV 2024's lists (only the lists are written anew)."""
    folder = tmp_path_factory.mktemp("tdsv2024") / "corpus"
    shutil.copytree(tiny_corpus, folder)
    return synthesize_corpus(folder, jobs=2, layout="tdsv2024", **TINY)


def _lines(path) -> list[tuple[str, ...]]:
    """The data lines of a docs list (header skipped), as field tuples."""
    return [line.fields for line in read_list(path)]


def _check_answer(out, name, trial_list):
    """The answer file and its zip: one finite score per trial, in the list's order."""
    answer = (out / name).read_text().splitlines()
    trials = _lines(trial_list)
    assert len(answer) == len(trials) > 0
    scored = [line.split() for line in (out / f"scores_{name[7:-4] or 'eval'}.txt").open()]
    assert [tuple(s[:2]) for s in scored] == [t[:2] for t in trials]  # the list's order
    assert [s[2] for s in scored] == answer
    zipped = out / f"submission_{name[7:-4] or 'eval'}.zip"
    with zipfile.ZipFile(zipped) as archive:
        assert archive.namelist() == ["answer.txt"]
        assert archive.read("answer.txt").decode().splitlines() == answer
    return zipped


@pytest.mark.slow
def test_the_tdsv2024_release_trains_scores_and_answers_both_lists(tmp_path, tdsv2024_corpus):
    corpus, out = tdsv2024_corpus, tmp_path / "exp"
    keys = corpus / "keys"
    assert not list((corpus / "docs").glob("*key*"))  # as the challenge ships it: no key there
    log = run_script(
        "train_speaker_embeddings.py", out, corpus, "--number_of_epochs", "1",
        "--eval_key_file", str(keys / "eval_trials_key.txt"),
    )  # fmt: skip
    assert "TdSV 2024 layout; dev: dev_model_enrollment.txt + dev_trials.txt (no key" in log
    assert f"to upload, {out / 'submission_eval.zip'} (holding answer.txt" in log
    assert f"to upload, {out / 'submission_dev.zip'} (holding answer_dev.txt" in log
    docs = corpus / "docs"
    assert len(_lines(docs / "dev_trials.txt")) != len(_lines(docs / "eval_trials.txt"))
    eval_zip = _check_answer(out, "answer.txt", docs / "eval_trials.txt")
    dev_zip = _check_answer(out, "answer_dev.txt", docs / "dev_trials.txt")
    # The eval list, keyed: its report; scored from the zip against the key, the same numbers.
    report = json.loads((out / "verification_eval.json").read_text())
    board = score_answer(eval_zip, docs / "eval_trials.txt", keys / "eval_trials_key.txt")
    for condition, metrics in report["conditions"].items():
        for name in ("eer", "min_dcf", "act_dcf"):
            assert board[condition][name] == pytest.approx(metrics[name], abs=1e-3), condition
    assert set(report["by_gender"]) <= {"m", "f"} and report["by_gender"]
    # The dev list was blind: reports without metrics. Rescored with its key (released since),
    # its report has them, equal to its answer file's against that key.
    dev_report = json.loads((out / "verification_dev.json").read_text())
    assert dev_report["conditions"] == {} and dev_report["submission"] == "submission_dev.zip"
    run_script(
        "verify_speakers.py", out, corpus, "--dev_key_file", str(keys / "dev_trials_key.txt")
    )
    dev_report = json.loads((out / "verification_dev.json").read_text())
    board = score_answer(dev_zip, docs / "dev_trials.txt", keys / "dev_trials_key.txt")
    pooled = dev_report["conditions"]["pooled"]
    assert board["pooled"]["eer"] == pytest.approx(pooled["eer"], abs=1e-3)
    assert board["pooled"]["min_dcf"] == pytest.approx(pooled["min_dcf"], abs=1e-3)
