"""Write what a verification run found: scores, metrics by condition, phrase and language.

Outputs in the experiment folder (DESIGN.md section 5):
- ``scores_<split>.txt``: ``model test score [label condition]``, one trial a line;
- ``verification_<split>.json``: EER / minDCF (with thresholds and trial counts) for the pooled
  condition and each TC-vs-X pair, and for the pooled condition by phrase and by language.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.layout import phrase_language
from recipes.scoring import metrics_by_condition


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
    """Write ``scores_<split>.txt`` and ``verification_<split>.json``; print a short table."""
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
    print(format_table(split, metrics))
    return report


def format_table(split, metrics) -> str:
    """A compact terminal table of the conditions."""
    rows = [f"{split:>8} | {'condition':<10} | {'EER %':>7} | {'minDCF':>7} | targets | nontargets"]
    for name, m in metrics.items():
        rows.append(
            f"{'':>8} | {name:<10} | {m['eer']:7.3f} | {m['min_dcf']:7.4f} | "
            f"{m['targets']:7d} | {m['nontargets']:10d}"
        )
    return "\n".join(rows)
