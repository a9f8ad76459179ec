"""Write what a verification run found: scores, metrics by condition, phrase and language.

Outputs in the experiment folder (docs/design.md section 5):
- ``scores_<split>.txt``: ``model test score [speaker phrase content [quality]] [label
  condition]``, one trial a line (``score`` is the fused LLR when there is a fusion; with a phrase
  branch, the trial's features follow it, in ``trial_decisions.TRIAL_FEATURES`` order, then those of
  the quality measures the fusion weights: ``log_test_duration log_enrol_duration`` for
  ``duration``, ``test_cohort_mean model_cohort_mean`` for ``cohort``);
- ``verification_<split>.json``: EER / minDCF (with thresholds and trial counts), and for fused
  LLRs the actual DCF at the Bayes threshold and Cllr, for the pooled condition and each TC-vs-X
  pair, and for the pooled condition by phrase, by language and by gender (where the corpus
  gives them);
- ``det_<split>.png``: DET curves (normal-deviate axes) per condition with the EER and minDCF
  points (dashed: the speaker score alone, when the scores are fused), and a score histogram per
  condition;
- for each official list pair (``eval``, TdSV 2024's ``dev``) the challenge's answer file
  (``answer.txt``, ``answer_dev.txt``: one score per line in the trial list's order) and
  ``submission_<split>.zip`` holding it as ``answer.txt`` (``recipes/evaluation/submission.py``:
  written only when every trial of the list is scored, each score finite).

With score normalization or quality measures the split name carries them
(``scores_eval_as-norm.txt``, ``answer_quality-duration.txt``, ...), so runs with different
settings do not overwrite each other.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from scipy.stats import norm

from recipes.disk import named_write_failures
from recipes.evaluation.metrics import operating_points
from recipes.evaluation.scoring import (
    CONDITION_PAIRS,
    condition_pair,
    labelled,
    metrics_by_condition,
)
from recipes.evaluation.submission import (
    answer_file,
    check_finite,
    submission_file,
    submission_problem,
    write_submission,
)
from recipes.model import trial_decisions

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

# The run's log.txt records DEBUG lines: matplotlib's font search would fill it with hundreds.
logging.getLogger("matplotlib").setLevel(logging.WARNING)
logger = logging.getLogger(__name__)


def breakdown(scores, trials: pd.DataFrame, key: pd.Series, llr: bool = False) -> dict:
    """Pooled metrics within each value of ``key`` (one value per trial)."""
    results = {}
    for value in sorted(key.dropna().unique()):  # not set(key): a Python loop over 10M trials
        keep = (key == value).to_numpy()
        pooled = metrics_by_condition(scores[keep], trials["condition"].to_numpy()[keep], llr)
        if "pooled" in pooled:
            results[value] = pooled["pooled"]
    return results


def write_report(
    output_folder, split, trials, scores, metrics, models=None, parts=None, official=None
) -> dict:
    """Write the score file, the JSON report, the DET plot (and an official list's submission).

    ``parts`` (a ``recipes.evaluation.fusion.TrialScores``) adds a column per trial feature and,
    when ``scores`` are fused from them, the speaker-only DET curves. ``official``: the list's
    record (``data_prep.manifests.official_record``), which its answer file is checked against
    (``submission.submission_problem``): a list that lost trials gets reports, no answer file.
    The split's files are published together (``published_together``): a failure while writing
    them (a full disk) leaves the previous ones as they were, never a truncated score file
    beside an older report.
    """
    folder = Path(output_folder)
    folder.mkdir(parents=True, exist_ok=True)
    kept = f"the previous {split} reports are whole"
    with (
        named_write_failures(f"the {split} reports", folder, kept),
        tempfile.TemporaryDirectory(dir=folder, prefix=f".report_{split}.") as staging,
    ):
        report = _write_report_files(
            Path(staging), split, trials, scores, metrics, models, parts, official
        )
        published_together(Path(staging), folder, report_files(split))
    if report.get("submission"):
        logger.info("%s: to upload, %s (holding %s as answer.txt)", split,
                    folder / report["submission"], answer_file(split))  # fmt: skip
    if metrics:
        print(format_table(split, metrics))
    return report


def report_files(split: str) -> list[str]:
    """The names of a split's report files (those it writes; submissions for official lists)."""
    names = [f"scores_{split}.txt", f"verification_{split}.json", f"det_{split}.png"]
    answer = answer_file(split)
    return names if answer is None else [*names, answer, submission_file(split)]


def published_together(staging: Path, folder: Path, names: list[str]) -> None:
    """Move the files ``names`` from ``staging`` into ``folder``; remove those not written.

    A file of an earlier report that this one does not write (a DET plot of a run that had
    labels) goes, so the folder never mixes two reports of one split. Renames only: the
    window in which a reader could see both is that of a few renames.
    """
    for name in names:
        source, target = staging / name, folder / name
        if source.exists():
            os.replace(source, target)
        elif target.exists():
            target.unlink()


def reported_features(features) -> list[str]:
    """The trial features a score file lists: ``TRIAL_FEATURES``, then the quality features held.

    ``features``: the trials' features by name; those of the quality measures the fusion
    weighted follow in ``QUALITY_MEASURES`` order.
    """
    quality = trial_decisions.QUALITY_MEASURES
    held = [measure for measure, names in quality.items() if names[0] in features]
    return [*trial_decisions.TRIAL_FEATURES, *trial_decisions.quality_features(held)]


def score_columns(quality) -> list[str]:
    """The columns of a labelled score file of a phrase-branch model weighting ``quality``."""
    features = [*trial_decisions.TRIAL_FEATURES, *trial_decisions.quality_features(quality)]
    return ["model_id", "test_id", "score", *features, "label", "condition"]


def _write_report_files(folder: Path, split, trials, scores, metrics, models, parts, official):
    """Write a split's report files into ``folder``; the JSON report."""
    scores = np.asarray(scores)
    score_text = _formatted(scores)
    columns = [trials["model_id"], trials["test_id"], score_text]
    if parts is not None and parts.has_phrase:  # every feature, in TRIAL_FEATURES order
        columns += [_formatted(parts.features[n]) for n in reported_features(parts.features)]
    if labelled(trials):
        columns += [trials["label"], trials["condition"]]
    lines = pd.concat([c.reset_index(drop=True) for c in columns], axis=1)
    lines.to_csv(folder / f"scores_{split}.txt", sep=" ", header=False, index=False)
    llr = bool(metrics) and "act_dcf" in metrics.get("pooled", {})
    report = {"split": split, "trials": len(trials), "llr": llr, "conditions": metrics}
    if models is not None and metrics:
        by_model = models.set_index("model_id")
        phrase = trials["model_id"].map(by_model["phrase_id"])
        report["by_phrase"] = breakdown(scores, trials, phrase, llr)
        for column in ("language", "gender"):  # the manifest's, where the corpus gives them
            if column in by_model and (column == "language" or (by_model[column] != "").any()):
                values = by_model[column]
                value = trials["model_id"].map(values.where(values != ""))
                report[f"by_{column}"] = breakdown(scores, trials, value, llr)
    if answer_file(split) is not None:
        report["submission"] = _submission(folder, split, scores, score_text, official)
    (folder / f"verification_{split}.json").write_text(json.dumps(report, indent=2))
    if metrics:
        speaker_only = parts.speaker if parts is not None and llr else None
        plot_det(
            folder / f"det_{split}.png",
            split,
            scores,
            trials["condition"].to_numpy(),
            metrics,
            speaker_only,
        )
    return report


def _submission(folder: Path, split, scores, score_text, official) -> str | None:
    """Write an official list's answer file and zip when its scores can be one; the zip's name.

    A non-finite score is an error; a count other than the list's (trials left out by
    ``skip_bad``) a warning, and no submission.
    """
    check_finite(scores, split)
    problem = submission_problem(len(scores), official)
    if problem:
        logger.warning("%s: no answer file: %s", split, problem)
        return None
    write_submission(folder, split, "".join(f"{text}\n" for text in score_text))
    return submission_file(split)


def _formatted(values) -> pd.Series:
    """Scores as text with 6 decimals."""
    return pd.Series(np.asarray(values)).map("{:.6f}".format)


def plot_det(path, split, scores, conditions, metrics, speaker_only=None) -> None:
    """DET curves per condition pair with the EER and minDCF points, and score histograms.

    Each histogram panel shows the target (TC) scores against one pair's non-target scores.
    ``speaker_only`` (the speaker scores the ``scores`` were fused from) adds dashed DET curves.
    """
    figure = plt.figure(figsize=(14, 6))
    grid = figure.add_gridspec(2, 4)
    det = figure.add_subplot(grid[:, :2])
    panels = iter([grid[0, 2], grid[0, 3], grid[1, 2], grid[1, 3]])
    bins = np.linspace(scores.min(), scores.max(), 50)
    for name, impostors in CONDITION_PAIRS.items():
        if name not in metrics:
            continue
        targets, nontargets = condition_pair(scores, conditions, impostors)
        m = metrics[name]
        points = operating_points(targets, nontargets)
        (line,) = det.plot(*_det_xy(points), label=f"{name}: EER {m['eer']:.2f} %, "
                           f"minDCF {m['min_dcf']:.3f}")  # fmt: skip
        eer_point = norm.ppf(np.clip(m["eer"] / 100, DET_CLIP, 1 - DET_CLIP))
        det.plot(eer_point, eer_point, "o", color=line.get_color())
        x, y = _det_xy(points, m["min_dcf_threshold"])
        det.plot(x, y, "s", color=line.get_color(), fillstyle="none", markersize=8)
        if speaker_only is not None:
            reference = operating_points(*condition_pair(speaker_only, conditions, impostors))
            det.plot(*_det_xy(reference), "--", label=f"{name}, speaker score only",
                     color=line.get_color())  # fmt: skip
        panel = figure.add_subplot(next(panels))
        panel.hist(targets, bins, histtype="step", density=True, label="TC")
        panel.hist(nontargets, bins, histtype="step", density=True, label="+".join(impostors))
        panel.axvline(m["eer_threshold"], color="grey", linestyle=":", linewidth=0.8)
        panel.set_title(name, fontsize=9)
        panel.legend(fontsize=7)
        panel.tick_params(labelsize=7)
    ticks = np.array([0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95])
    det.set_xticks(norm.ppf(ticks), [f"{100 * t:g}" for t in ticks])
    det.set_yticks(norm.ppf(ticks), [f"{100 * t:g}" for t in ticks])
    det.plot([-4, 4], [-4, 4], ":", color="grey", linewidth=0.8)
    det.set(xlim=(-3.3, 1.8), ylim=(-3.3, 1.8), xlabel="false alarm rate (%)")
    det.set(ylabel="miss rate (%)", title=f"DET, {split} (o: EER, square: minDCF)")
    det.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


#: DET axes are normal deviates of rates clipped to [DET_CLIP, 1 - DET_CLIP].
DET_CLIP = 1e-4


def _det_xy(points, threshold=None):
    """Normal-deviate false-alarm and miss rates: the curve, or its point at ``threshold``.

    ``points`` are ``metrics.operating_points``. The curve keeps about 2,000 of its points,
    evenly spaced along both deviate axes: the same line at any plotting resolution, where 10M
    trials gave 10M points to transform and draw.
    """
    if threshold is not None:
        at = min(np.searchsorted(points.thresholds, threshold), points.p_fa.size - 1)
        chosen = np.array([at])
    else:
        grid = norm.cdf(np.linspace(-4, 4, 1000))
        size = points.p_miss.size
        along_miss = np.searchsorted(points.p_miss, grid)  # p_miss rises with the threshold
        along_fa = size - 1 - np.searchsorted(points.p_fa[::-1], grid)  # p_fa falls
        chosen = np.unique(np.clip(np.r_[0, along_miss, along_fa, size - 1], 0, size - 1))
    x = norm.ppf(np.clip(points.p_fa[chosen], DET_CLIP, 1 - DET_CLIP))
    y = norm.ppf(np.clip(points.p_miss[chosen], DET_CLIP, 1 - DET_CLIP))
    return (x, y) if threshold is None else (x[0], y[0])


def format_table(split, metrics) -> str:
    """A compact terminal table of the conditions."""
    rows = [
        f"{split:>8} | {'condition':<10} | {'EER %':>7} | {'minDCF':>7} | {'actDCF':>7} | "
        f"{'Cllr':>6} | targets | nontargets"
    ]
    for name, m in metrics.items():
        act = (
            f"{m['act_dcf']:7.4f} | {m['cllr']:6.3f}" if "act_dcf" in m else f"{'-':>7} | {'-':>6}"
        )
        rows.append(
            f"{'':>8} | {name:<10} | {m['eer']:7.3f} | {m['min_dcf']:7.4f} | {act} | "
            f"{m['targets']:7d} | {m['nontargets']:10d}"
        )
    return "\n".join(rows)
