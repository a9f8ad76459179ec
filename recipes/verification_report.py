"""Write what a verification run found: scores, metrics by condition, phrase and language.

Outputs in the experiment folder (DESIGN.md section 5):
- ``scores_<split>.txt``: ``model test score [label condition]``, one trial a line;
- ``verification_<split>.json``: EER / minDCF (with thresholds and trial counts) for the pooled
  condition and each TC-vs-X pair, and for the pooled condition by phrase and by language;
- ``det_<split>.png``: DET curves (normal-deviate axes) per condition with the EER and minDCF
  points, and a score histogram per condition;
- ``answer.txt`` for the eval split: one score per line in the order of ``trials.txt``, the
  challenge's submission format.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from scipy.stats import norm

from data_prep.layout import phrase_language
from recipes.metrics import operating_points
from recipes.scoring import CONDITION_PAIRS, metrics_by_condition

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def breakdown(scores, trials: pd.DataFrame, key: pd.Series) -> dict:
    """Pooled metrics within each value of ``key`` (one value per trial)."""
    results = {}
    for value in sorted(set(key)):
        keep = (key == value).to_numpy()
        pooled = metrics_by_condition(scores[keep], trials["condition"].to_numpy()[keep])
        if "pooled" in pooled:
            results[value] = pooled["pooled"]
    return results


def write_report(output_folder, split, trials, scores, metrics, models=None) -> dict:
    """Write the score file, the JSON report, the DET plot (and the answer file for eval)."""
    folder = Path(output_folder)
    folder.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scores)
    columns = [trials["model_id"], trials["test_id"], pd.Series(scores).map("{:.6f}".format)]
    if (trials["condition"] != "").all():
        columns += [trials["label"], trials["condition"]]
    lines = pd.concat([c.reset_index(drop=True) for c in columns], axis=1)
    lines.to_csv(folder / f"scores_{split}.txt", sep=" ", header=False, index=False)
    report = {"split": split, "trials": len(trials), "conditions": metrics}
    if models is not None and metrics:
        phrase = trials["model_id"].map(models.set_index("model_id")["phrase_id"])
        report["by_phrase"] = breakdown(scores, trials, phrase)
        report["by_language"] = breakdown(scores, trials, phrase.map(phrase_language))
    (folder / f"verification_{split}.json").write_text(json.dumps(report, indent=2))
    if split == "eval":
        np.savetxt(folder / "answer.txt", scores, fmt="%.6f")
    if metrics:
        plot_det(
            folder / f"det_{split}.png", split, scores, trials["condition"].to_numpy(), metrics
        )
        print(format_table(split, metrics))
    return report


def plot_det(path, split, scores, conditions, metrics) -> None:
    """DET curves per condition pair (EER and minDCF points marked) and score histograms."""
    figure, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    det, hist = axes
    clip = 1e-4
    for name, impostors in CONDITION_PAIRS.items():
        if name not in metrics:
            continue
        keep = (conditions == "TC") | np.isin(conditions, impostors)
        labels = conditions[keep] == "TC"
        points = operating_points(scores[keep][labels], scores[keep][~labels])
        x = norm.ppf(np.clip(points.p_fa, clip, 1 - clip))
        y = norm.ppf(np.clip(points.p_miss, clip, 1 - clip))
        m = metrics[name]
        (line,) = det.plot(x, y, label=f"{name}: EER {m['eer']:.2f} %, minDCF {m['min_dcf']:.3f}")
        eer_point = norm.ppf(np.clip(m["eer"] / 100, clip, 1 - clip))
        det.plot(eer_point, eer_point, "o", color=line.get_color())
        at = np.searchsorted(points.thresholds, m["min_dcf_threshold"])
        det.plot(x[at], y[at], "s", color=line.get_color(), fillstyle="none")
    ticks = np.array([0.001, 0.01, 0.05, 0.2, 0.5, 0.8])
    for set_ticks, set_labels in (
        (det.set_xticks, det.set_xticklabels),
        (det.set_yticks, det.set_yticklabels),
    ):
        set_ticks(norm.ppf(ticks))
        set_labels([f"{100 * t:g}" for t in ticks])
    det.plot([-4, 4], [-4, 4], ":", color="grey", linewidth=0.8)
    det.set(xlim=(-3.3, 1), ylim=(-3.3, 1), xlabel="false alarm rate (%)", ylabel="miss rate (%)")
    det.set_title(f"DET, {split} (o: EER, square: minDCF)")
    det.legend(fontsize=8, loc="upper right")
    bins = np.linspace(scores.min(), scores.max(), 60)
    for condition in ("TC", "TW", "IC", "IW"):
        if (conditions == condition).any():
            hist.hist(
                scores[conditions == condition],
                bins,
                histtype="step",
                density=True,
                label=condition,
            )
    hist.set(xlabel="score", ylabel="density", title="scores by trial condition")
    hist.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_table(split, metrics) -> str:
    """A compact terminal table of the conditions."""
    rows = [f"{split:>8} | {'condition':<10} | {'EER %':>7} | {'minDCF':>7} | targets | nontargets"]
    for name, m in metrics.items():
        rows.append(
            f"{'':>8} | {name:<10} | {m['eer']:7.3f} | {m['min_dcf']:7.4f} | "
            f"{m['targets']:7d} | {m['nontargets']:10d}"
        )
    return "\n".join(rows)
