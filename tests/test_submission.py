"""The challenge's submission: answer files and zips of the official lists, checked and scored."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest

from recipes.evaluation.scoring import metrics_by_condition
from recipes.evaluation.submission import (
    answer_file,
    read_answer,
    score_answer,
    submission_file,
)
from recipes.evaluation.verification_report import write_report
from tests.helpers import ROOT


def test_each_official_split_has_its_answer_file_and_zip():
    assert [answer_file(r) for r in ("eval", "eval_as-norm", "dev", "dev_gate", "valid")] == [
        "answer.txt", "answer_as-norm.txt", "answer_dev.txt", "answer_dev_gate.txt", None
    ]  # fmt: skip
    assert [submission_file(r) for r in ("eval", "dev_as-norm", "valid_speaker")] == [
        "submission_eval.zip", "submission_dev_as-norm.zip", None
    ]  # fmt: skip


def _labelled(n=60, seed=0):
    """Trials of every condition with scores that separate them: (trials, scores)."""
    rng = np.random.default_rng(seed)
    conditions = np.array(["TC", "TW", "IC", "IW"] * (n // 4))
    scores = np.where(conditions == "TC", 2.0, -2.0) + rng.standard_normal(n)
    trials = pd.DataFrame({
        "model_id": [f"m{i % 5}" for i in range(n)], "test_id": [f"t{i}" for i in range(n)],
        "label": (conditions == "TC").astype(int).astype(str), "condition": conditions,
    })  # fmt: skip
    return trials, scores


def _official(count, path="docs/eval_trials.txt"):
    return {"trial_list": path, "listed_trials": count, "kept_trials": count}


@pytest.mark.parametrize("split", ["eval", "dev"])
def test_an_official_list_gets_its_answer_file_and_a_zip_of_it_alone(tmp_path, split):
    trials, scores = _labelled()
    write_report(tmp_path, split, trials, scores, {}, official=_official(len(trials)))
    answer = (tmp_path / answer_file(split)).read_text()
    assert answer.splitlines() == [f"{s:.6f}" for s in scores]  # list order, no header
    with zipfile.ZipFile(tmp_path / f"submission_{split}.zip") as archive:
        assert archive.namelist() == ["answer.txt"]
        assert archive.read("answer.txt").decode() == answer
    report = json.loads((tmp_path / f"verification_{split}.json").read_text())
    assert report["submission"] == f"submission_{split}.zip"
    zipped = (tmp_path / f"submission_{split}.zip").read_bytes()
    write_report(tmp_path, split, trials, scores, {}, official=_official(len(trials)))
    assert (tmp_path / f"submission_{split}.zip").read_bytes() == zipped  # same scores, bytes


def test_the_validation_split_gets_no_submission(tmp_path):
    trials, scores = _labelled()
    write_report(tmp_path, "valid", trials, scores, {})
    assert not list(tmp_path.glob("answer*")) and not list(tmp_path.glob("submission*"))


def test_a_list_that_lost_trials_gets_reports_and_no_answer_file(tmp_path, caplog):
    trials, scores = _labelled()
    write_report(tmp_path, "eval", trials, scores, {}, official=_official(len(trials)))
    caplog.set_level(logging.WARNING)
    write_report(tmp_path, "eval", trials[1:], scores[1:], {}, official=_official(len(trials)))
    assert (
        not (tmp_path / "answer.txt").exists() and not (tmp_path / "submission_eval.zip").exists()
    )
    assert "59 scores for the 60 trials of docs/eval_trials.txt" in caplog.text
    assert len((tmp_path / "scores_eval.txt").read_text().splitlines()) == 59


def test_a_non_finite_score_is_no_answer(tmp_path):
    trials, scores = _labelled()
    write_report(tmp_path, "eval", trials, scores, {}, official=_official(len(trials)))
    before = (tmp_path / "answer.txt").read_text()
    scores[7] = np.nan
    with pytest.raises(
        ValueError, match=r"eval: 1 non-finite score\(s\) \(first on trial line 8\)"
    ):
        write_report(tmp_path, "eval", trials, scores, {}, official=_official(len(trials)))
    assert (tmp_path / "answer.txt").read_text() == before  # the previous report stays whole


def _lists(tmp_path, trials):
    """The trial list and its key of ``trials``, as the challenge's files."""
    pairs = trials["model_id"] + " " + trials["test_id"]
    trial_list, key = tmp_path / "eval_trials.txt", tmp_path / "eval_trials_key.txt"
    trial_list.write_text("model-id evaluation-file-id\n" + "\n".join(pairs) + "\n")
    target = np.where(trials["condition"] == "TC", "target", "nontarget")
    key_lines = pairs + " " + target + " " + trials["condition"]
    key.write_text("model-id evaluation-file-id target-type trial-type\n" + "\n".join(key_lines))
    return trial_list, key


def test_a_submission_scored_against_its_key_gives_the_reports_numbers(tmp_path):
    trials, scores = _labelled(200)
    write_report(tmp_path, "eval", trials, scores, {}, official=_official(len(trials)))
    trial_list, key = _lists(tmp_path, trials)
    scored = score_answer(tmp_path / "submission_eval.zip", trial_list, key)
    expected = metrics_by_condition(scores, trials["condition"], llr=True)
    for condition, metrics in expected.items():
        for name in ("eer", "min_dcf", "act_dcf", "cllr"):
            assert scored[condition][name] == pytest.approx(metrics[name], abs=1e-4), name


def test_a_submission_is_checked_against_its_list(tmp_path):
    trials, scores = _labelled()
    write_report(tmp_path, "eval", trials, scores, {}, official=_official(len(trials)))
    trial_list, _ = _lists(tmp_path, trials)
    command = [sys.executable, str(ROOT / "recipes/evaluation/submission.py")]
    ok = subprocess.run([*command, str(tmp_path / "submission_eval.zip"), "--trials",
                         str(trial_list)], capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0 and "one finite score for each of the 60 trials" in ok.stdout
    trial_list.write_text(trial_list.read_text() + "m0 t999\n")
    short = subprocess.run([*command, str(tmp_path / "answer.txt"), "--trials",
                            str(trial_list)], capture_output=True, text=True)  # fmt: skip
    assert short.returncode != 0 and "60 scores for the 61 trials" in short.stderr
    with zipfile.ZipFile(tmp_path / "extra.zip", "w") as archive:
        archive.writestr("answer.txt", "1.0\n")
        archive.writestr("notes.txt", "")
    with pytest.raises(ValueError, match=r"holds \['answer.txt', 'notes.txt'\]"):
        read_answer(tmp_path / "extra.zip")
    (tmp_path / "bad.txt").write_text("1.0\nnan x\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: 'nan x' is not one number"):
        read_answer(tmp_path / "bad.txt")
    with zipfile.ZipFile(tmp_path / "latin1.zip", "w") as archive:
        archive.writestr("answer.txt", "1.0\n2,5 é\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.zip:answer.txt:2: not UTF-8 \(byte 0xe9\)"):
        read_answer(tmp_path / "latin1.zip")
