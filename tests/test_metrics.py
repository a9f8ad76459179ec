"""EER and minDCF against independent references, on random and adversarial inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from recipes.evaluation.metrics import eer, min_dcf, verification_metrics


def reference_eer(targets, nontargets) -> float:
    """EER from scikit-learn's ROC: linear interpolation where FNR - FPR changes sign."""
    labels = np.r_[np.ones(len(targets)), np.zeros(len(nontargets))]
    fpr, tpr, _ = roc_curve(labels, np.r_[targets, nontargets], drop_intermediate=False)
    fnr = 1 - tpr
    # roc_curve goes from "reject all" (fpr 0, fnr 1) to "accept all" (fpr 1, fnr 0).
    diff = fnr - fpr
    i = int(np.nonzero(diff <= 0)[0][0])
    if diff[i] == 0:
        return float(fnr[i])
    a = diff[i - 1] / (diff[i - 1] - diff[i])
    return float(fnr[i - 1] + a * (fnr[i] - fnr[i - 1]))


def brute_force_min_dcf(targets, nontargets, p_target=0.01, c_miss=10, c_fa=1) -> float:
    """MinDCF by trying every threshold, one at a time."""
    targets, nontargets = np.asarray(targets), np.asarray(nontargets)
    best = np.inf
    for t in [*np.unique(np.r_[targets, nontargets]), np.inf]:
        p_miss = np.mean(targets < t)
        p_fa = np.mean(nontargets >= t)
        best = min(best, c_miss * p_target * p_miss + c_fa * (1 - p_target) * p_fa)
    return best / min(c_miss * p_target, c_fa * (1 - p_target))


def _random_case(seed):
    rng = np.random.default_rng(seed)
    n_t, n_n = rng.integers(1, 60), rng.integers(1, 400)
    targets = rng.normal(rng.uniform(0, 3), 1, n_t)
    nontargets = rng.normal(0, 1, n_n)
    if seed % 3 == 0:  # heavy ties: scores on a coarse grid
        targets, nontargets = np.round(targets), np.round(nontargets)
    return targets, nontargets


@pytest.mark.parametrize("seed", range(40))
def test_random_inputs_match_references(seed):
    targets, nontargets = _random_case(seed)
    assert eer(targets, nontargets)[0] == pytest.approx(
        reference_eer(targets, nontargets), abs=1e-12
    )
    assert min_dcf(targets, nontargets)[0] == pytest.approx(
        brute_force_min_dcf(targets, nontargets), abs=1e-12
    )
    assert min_dcf(targets, nontargets, p_target=0.05, c_miss=1, c_fa=1)[0] == pytest.approx(
        brute_force_min_dcf(targets, nontargets, 0.05, 1, 1), abs=1e-12
    )


@pytest.mark.parametrize(
    ("targets", "nontargets", "expected_eer", "expected_dcf"),
    [
        ([1.0, 1.0], [1.0, 1.0, 1.0], 0.5, 1.0),  # all scores equal
        ([2.0, 3.0], [0.0, 1.0], 0.0, 0.0),  # perfect separation
        ([0.0, 1.0], [2.0, 3.0], 1.0, 1.0),  # perfectly wrong
        ([0.5], [0.0, 1.0], 0.5, 1.0),  # one target in the middle
    ],
)
def test_adversarial_inputs(targets, nontargets, expected_eer, expected_dcf):
    assert eer(targets, nontargets)[0] == pytest.approx(expected_eer)
    assert eer(targets, nontargets)[0] == pytest.approx(reference_eer(targets, nontargets))
    assert min_dcf(targets, nontargets)[0] == pytest.approx(expected_dcf)
    assert expected_dcf == pytest.approx(brute_force_min_dcf(targets, nontargets))


def test_eer_threshold_separates_at_the_crossing():
    rng = np.random.default_rng(0)
    targets, nontargets = rng.normal(2, 1, 5000), rng.normal(0, 1, 50000)
    rate, threshold = eer(targets, nontargets)
    assert np.mean(targets < threshold) == pytest.approx(rate, abs=2e-3)
    assert np.mean(nontargets >= threshold) == pytest.approx(rate, abs=2e-3)
    # Two unit-variance Gaussians 2 apart cross at 1: EER = Phi(-1) = 15.87 %.
    assert rate == pytest.approx(0.1587, abs=0.01) and threshold == pytest.approx(1.0, abs=0.05)


def test_min_dcf_is_normalized_and_bounded():
    rng = np.random.default_rng(1)
    value, _ = min_dcf(rng.normal(0, 1, 1000), rng.normal(0, 1, 1000))
    assert 0.9 < value <= 1.0  # random scores: no better than always rejecting


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="no target"):
        eer([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        min_dcf([np.nan], [1.0])


def test_verification_metrics_reports_counts_and_percent():
    result = verification_metrics([0.9, 0.8, 0.1, 0.2, 0.3], [1, 1, 0, 0, 0])
    assert result["eer"] == 0.0 and result["targets"] == 2 and result["nontargets"] == 3
