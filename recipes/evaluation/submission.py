"""The challenge's submission: an official list's answer file, its zip, and their checks.

The SdSV and TdSV leaderboards take a zip holding only ``answer.txt`` at its root: one score (an
LLR) per line, in the trial list's order, no header, every trial of the list scored
(docs/design.md section 3). TdSV 2024 reports dev and eval from such submissions, one per list.

A run writes, for each official split (``data_prep.corpus.OFFICIAL_SPLITS``), the answer file
(``answer.txt`` for eval, ``answer_dev.txt`` for dev; report tags follow, ``answer_as-norm.txt``)
and ``submission_<report>.zip`` holding it as ``answer.txt``, once the scores pass
``submission_problem``: one finite number per trial of the list, the list's count (a list that
lost trials to ``skip_bad`` can give none). Before uploading, check a zip against its list, and
with a key (released after a challenge) score it as the leaderboard would::

    python recipes/evaluation/submission.py results/wavlm_td/1986/submission_eval.zip \
        --trials /data/TdSV2024/task1/docs/eval_trials.txt [--key eval_trials_key.txt]
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_prep.corpus import OFFICIAL_SPLITS
from data_prep.manifests import not_utf8, read_list, read_utf8
from recipes.evaluation.scoring import metrics_by_condition

#: The answer file's name inside a submission zip.
ANSWER = "answer.txt"


def official_split(report: str) -> str | None:
    """The official split a report name (``eval``, ``dev_as-norm``, ...) belongs to, or None.

    Report names are ``<split>[_<tag>...]`` and no tag holds an underscore
    (``verification.report_name``).
    """
    split = report.split("_", 1)[0]
    return split if split in OFFICIAL_SPLITS else None


def answer_file(report: str) -> str | None:
    """The answer file of a report of an official split; None for the validation split.

    ``eval`` -> ``answer.txt``, ``eval_as-norm`` -> ``answer_as-norm.txt``, ``dev`` ->
    ``answer_dev.txt``.
    """
    split = official_split(report)
    if split is None:
        return None
    rest = report if split != "eval" else report[len("eval") :].lstrip("_")
    return f"answer_{rest}.txt" if rest else ANSWER


def submission_file(report: str) -> str | None:
    """The zip to upload for a report of an official split (``submission_<report>.zip``)."""
    return f"submission_{report}.zip" if official_split(report) else None


def submission_problem(count: int, official: dict | None) -> str | None:
    """Why ``count`` scores cannot be an official list's answer file; None when they can.

    ``official``: the list's record (``data_prep.manifests.official_record``), None where the
    caller has none (then only the scores themselves are checked).
    """
    if official is None or count == official["listed_trials"]:
        return None
    return (
        f"{count} scores for the {official['listed_trials']} trials of "
        f"{official['trial_list']} (bad files or lines were left out: see rejected.csv): a "
        "submission scores every trial"
    )


def check_finite(scores: np.ndarray, report: str) -> None:
    """Refuse an answer with a non-finite score (the leaderboard would reject or misread it)."""
    bad = ~np.isfinite(np.asarray(scores, dtype=np.float64))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{report}: {int(bad.sum())} non-finite score(s) (first on trial line {first + 1}): "
            "no answer file is written"
        )


def write_submission(folder: Path, report: str, answer_text: str) -> None:
    """Write a report's answer file and its zip into ``folder``.

    The zip holds only ``answer.txt`` at its root, with a fixed time stamp: the same scores give
    the same bytes.
    """
    answer, submission = answer_file(report), submission_file(report)
    (folder / answer).write_text(answer_text)
    entry = zipfile.ZipInfo(ANSWER, date_time=(1980, 1, 1, 0, 0, 0))
    entry.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(folder / submission, "w") as archive:
        archive.writestr(entry, answer_text)


def read_answer(path) -> np.ndarray:
    """The scores of an answer file, or of a submission zip (which must hold only answer.txt)."""
    path = Path(path)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if names != [ANSWER]:
                raise ValueError(f"{path} holds {names}: a submission holds only {ANSWER}")
            data = archive.read(ANSWER)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise not_utf8(f"{path}:{ANSWER}", data, error) from None
    else:
        text = read_utf8(path)
    lines = text.splitlines()
    scores = np.full(len(lines), np.nan)
    for number, line in enumerate(lines, start=1):
        try:
            scores[number - 1] = float(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: {line!r} is not one number") from None
    return scores


def check_answer(scores: np.ndarray, trial_list, where: str = "answer") -> list:
    """The trial list's ``(model, test)`` pairs, once ``scores`` has one finite score each."""
    trials = [line.fields[:2] for line in read_list(trial_list)]
    if len(scores) != len(trials):
        raise ValueError(
            f"{where}: {len(scores)} scores for the {len(trials)} trials of {trial_list}"
        )
    check_finite(scores, where)
    return trials


def score_answer(answer, trial_list, key) -> dict:
    """EER / minDCF by condition of an answer file (or zip) against a key, as a leaderboard.

    ``key``: ``model-id evaluation-file-id target|nontarget TC|TW|IC|IW`` lines, one per trial.
    """
    scores = read_answer(answer)
    trials = check_answer(scores, trial_list, str(answer))
    conditions = {tuple(line.fields[:2]): line.fields[3] for line in read_list(key)}
    missing = [pair for pair in trials if pair not in conditions]
    if missing:
        raise ValueError(
            f"{key}: no entry for {len(missing)} trial(s), e.g. {' '.join(missing[0])}"
        )
    return metrics_by_condition(scores, np.array([conditions[pair] for pair in trials]), llr=True)


def main(argv=None) -> None:
    """Check a submission (zip or answer file) against its trial list; score it with a key."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("answer", help="submission_<split>.zip or an answer file")
    parser.add_argument("--trials", required=True, help="the official trial list it answers")
    parser.add_argument("--key", help="model-id evaluation-file-id target-type trial-type lines")
    args = parser.parse_args(argv)
    try:
        if args.key:
            print(json.dumps(score_answer(args.answer, args.trials, args.key), indent=2))
        else:
            count = len(check_answer(read_answer(args.answer), args.trials, args.answer))
            print(
                f"{args.answer}: one finite score for each of the {count} trials of {args.trials}"
            )
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        sys.exit(f"submission: {error}")


if __name__ == "__main__":
    main()
