"""Verification metrics as the SdSV / TdSV challenges define them (docs/design.md section 5).

Both metrics come from one sweep over the sorted scores: O(N log N) time and O(N) memory. We do
not use SpeechBrain's ``EER`` / ``minDCF`` (``speechbrain.utils.metric_stats``): they build
N x thresholds matrices, which run out of memory on millions of trials, and its ``minDCF`` uses
other costs and no normalization.

A threshold accepts a trial when ``score >= threshold``. Operating points are taken at every
distinct score (ties move together) and at +inf (reject everything).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: SdSV cost model: C_miss = 10, C_fa = 1, P_target = 0.01.
SDSV_DCF = dict(p_target=0.01, c_miss=10.0, c_fa=1.0)


@dataclass(frozen=True)
class OperatingPoints:
    """Miss and false-alarm rates at each candidate threshold (ascending thresholds)."""

    thresholds: np.ndarray
    p_miss: np.ndarray
    p_fa: np.ndarray


def _as_scores(values, name: str) -> np.ndarray:
    """A 1-D float64 array of finite scores, or a clear error."""
    scores = np.asarray(values, dtype=np.float64).ravel()
    if scores.size == 0:
        raise ValueError(f"no {name} scores")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} scores contain NaN or inf")
    return scores


def operating_points(target_scores, nontarget_scores) -> OperatingPoints:
    """Miss / false-alarm rates at every distinct score and at +inf, from one sort per class."""
    targets = np.sort(_as_scores(target_scores, "target"))
    nontargets = np.sort(_as_scores(nontarget_scores, "non-target"))
    thresholds = np.unique(np.concatenate([targets, nontargets]))
    # Rates at "accept if score >= t": targets below t are misses, non-targets at or above t are
    # false alarms. searchsorted(..., "left") counts the scores strictly below t.
    p_miss = np.searchsorted(targets, thresholds, side="left") / targets.size
    p_fa = 1.0 - np.searchsorted(nontargets, thresholds, side="left") / nontargets.size
    return OperatingPoints(
        np.append(thresholds, np.inf), np.append(p_miss, 1.0), np.append(p_fa, 0.0)
    )


def eer(target_scores, nontarget_scores) -> tuple[float, float]:
    """Equal error rate and its threshold.

    The EER is where the miss and false-alarm rates cross, linearly interpolated between the two
    operating points that straddle the crossing (the ROC convex segment), so ties and small trial
    counts give the usual values (all scores equal -> 0.5; perfect separation -> 0.0).
    """
    points = operating_points(target_scores, nontarget_scores)
    gap = points.p_fa - points.p_miss  # starts at 1 (accept all), ends at -1 (reject all)
    k = int(np.argmax(gap <= 0))
    fraction = gap[k - 1] / (gap[k - 1] - gap[k])
    rate = points.p_miss[k - 1] + fraction * (points.p_miss[k] - points.p_miss[k - 1])
    low, high = points.thresholds[k - 1], points.thresholds[k]
    threshold = high if not np.isfinite(high) else low + fraction * (high - low)
    return float(rate), float(threshold)


def min_dcf(
    target_scores,
    nontarget_scores,
    p_target: float = SDSV_DCF["p_target"],
    c_miss: float = SDSV_DCF["c_miss"],
    c_fa: float = SDSV_DCF["c_fa"],
) -> tuple[float, float]:
    """Normalized minimum detection cost and its threshold (SdSV definition by default).

    C_det = c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target), divided by
    min(c_miss * p_target, c_fa * (1 - p_target)) and minimized over thresholds.
    """
    points = operating_points(target_scores, nontarget_scores)
    cost = normalized_cost(points.p_miss, points.p_fa, p_target, c_miss, c_fa)
    best = int(np.argmin(cost))
    return float(cost[best]), float(points.thresholds[best])


def normalized_cost(p_miss, p_fa, p_target: float, c_miss: float, c_fa: float):
    """C_det of miss / false-alarm rates, divided by the cost of the best trivial system."""
    cost = c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa
    return cost / min(c_miss * p_target, c_fa * (1 - p_target))


def bayes_threshold(
    p_target: float = SDSV_DCF["p_target"],
    c_miss: float = SDSV_DCF["c_miss"],
    c_fa: float = SDSV_DCF["c_fa"],
) -> float:
    """The LLR threshold of minimum expected cost: log(c_fa (1 - p_target) / (c_miss p_target))."""
    return float(np.log(c_fa * (1 - p_target) / (c_miss * p_target)))


def actual_dcf(
    target_llrs,
    nontarget_llrs,
    p_target: float = SDSV_DCF["p_target"],
    c_miss: float = SDSV_DCF["c_miss"],
    c_fa: float = SDSV_DCF["c_fa"],
) -> float:
    """Normalized detection cost of log-likelihood ratios decided at the Bayes threshold.

    What a calibrated system costs in use; ``min_dcf`` is its floor (the best threshold in
    hindsight), so ``actual_dcf / min_dcf`` measures the calibration.
    """
    targets = _as_scores(target_llrs, "target")
    nontargets = _as_scores(nontarget_llrs, "non-target")
    threshold = bayes_threshold(p_target, c_miss, c_fa)
    p_miss, p_fa = np.mean(targets < threshold), np.mean(nontargets >= threshold)
    return float(normalized_cost(p_miss, p_fa, p_target, c_miss, c_fa))


def cllr(target_llrs, nontarget_llrs) -> float:
    """Log-likelihood-ratio cost in bits (Brümmer): 0 is perfect, 1 is an uninformative system."""
    targets = _as_scores(target_llrs, "target")
    nontargets = _as_scores(nontarget_llrs, "non-target")
    nats = np.mean(np.logaddexp(0, -targets)) + np.mean(np.logaddexp(0, nontargets))
    return float(nats / (2 * np.log(2)))


def verification_metrics(scores, labels, llr: bool = False) -> dict:
    """EER (%), minDCF and their thresholds, and trial counts, for scores with 0/1 labels.

    With ``llr`` (the scores are calibrated log-likelihood ratios), also the actual DCF at the
    Bayes threshold of the SdSV costs and Cllr.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    targets, nontargets = scores[labels], scores[~labels]
    eer_value, eer_threshold = eer(targets, nontargets)
    dcf_value, dcf_threshold = min_dcf(targets, nontargets)
    metrics = {
        "eer": 100.0 * eer_value,
        "eer_threshold": eer_threshold,
        "min_dcf": dcf_value,
        "min_dcf_threshold": dcf_threshold,
        "targets": int(targets.size),
        "nontargets": int(nontargets.size),
    }
    if llr:
        metrics["act_dcf"] = actual_dcf(targets, nontargets)
        metrics["cllr"] = cllr(targets, nontargets)
    return metrics
