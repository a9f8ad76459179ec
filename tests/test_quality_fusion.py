"""Quality-aware fusion (``fusion_quality``): the measures, learning them, storing, reporting.

A quality measure adds trial features (log durations, cohort neighbourhoods) that every
calibration of the fusion also weights; these tests hold their arithmetic, show that a measure
the scores depend on improves calibration on held-out trials, and that fusions and reports of
other measures are kept apart. The exported folder's path is in tests/test_export.py.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
import pytest

from recipes.evaluation.fusion import (
    QualityInputs,
    TrialScores,
    learn_fusion,
    quality_scores,
    stored_or_learned_fusion,
    trial_scores,
)
from recipes.evaluation.metrics import actual_dcf, cllr
from recipes.evaluation.scoring import EmbeddingTable
from recipes.evaluation.verification import ScoringSettings, report_name
from recipes.evaluation.verification_report import write_report
from recipes.model.trial_decisions import (
    DEFAULT_QUALITY,
    calibrations_with,
    fused_llr,
    quality_features,
)


def _small_split(rng):
    """Four utterances of two speakers, two models, four trials; durations in seconds."""
    table = EmbeddingTable(["a1", "a2", "b1", "b2"], rng.normal(size=(4, 8)))
    models = pd.DataFrame({"model_id": ["A", "B"], "enrol_ids": ["a1", "b1"]})
    trials = pd.DataFrame({"model_id": ["A", "A", "B", "B"], "test_id": ["a2", "b2", "b2", "a2"]})
    seconds = pd.Series({"a1": 2.0, "a2": 1.5, "b1": 3.0, "b2": 0.8})
    return table, models, trials, seconds


def test_quality_measures_are_log_durations_and_top_k_cohort_means():
    rng = np.random.default_rng(0)
    table, models, trials, seconds = _small_split(rng)
    models.loc[0, "enrol_ids"] = "a1 b1"  # a two-utterance model: its whole enrollment counts
    cohort = rng.normal(size=(5, 8))
    inputs = QualityInputs(("duration", "cohort"), seconds, cohort, top_k=2)
    features = quality_scores(table, models, trials, inputs)
    assert list(features) == list(quality_features(("duration", "cohort")))
    assert features["log_test_duration"] == pytest.approx(np.log([1.5, 0.8, 0.8, 1.5]))
    assert features["log_enrol_duration"] == pytest.approx(np.log([5.0, 5.0, 3.0, 3.0]))

    def top2_mean(vector):  # of its cosines against the cohort's speakers
        cosines = cohort @ vector / np.linalg.norm(cohort, axis=1) / np.linalg.norm(vector)
        return np.sort(cosines)[-2:].mean()

    vectors = dict(zip(table.ids, table.matrix, strict=True))
    assert features["test_cohort_mean"][1] == pytest.approx(top2_mean(vectors["b2"]))
    model_a = sum(v / np.linalg.norm(v) for v in (vectors["a1"], vectors["b1"]))
    assert features["model_cohort_mean"][0] == pytest.approx(top2_mean(model_a))
    # The features join the trial's others; without a cohort, the cohort measure is refused.
    scores = trial_scores({"speaker": table}, models, trials, quality=inputs)
    assert set(scores.features) == {"speaker", *features}
    with pytest.raises(ValueError, match="cohort"):
        quality_scores(table, models, trials, inputs._replace(cohort=None))


def _trials_whose_targets_depend_on_duration(rng, n=2000):
    """Dev-like trials whose target speaker scores fall for short tests (0.5 s to 4 s)."""
    conditions = np.array(["TC", "TW", "IC", "IW"] * (n // 4))
    same_speaker = np.isin(conditions, ["TC", "TW"])
    same_phrase = np.isin(conditions, ["TC", "IC"])
    log_test = np.log(rng.uniform(0.5, 4.0, size=n))
    speaker = np.where(same_speaker, 0.4 + 0.25 * log_test, 0.1) + 0.08 * rng.normal(size=n)
    phrase = np.where(same_phrase, -0.05, -6.0) + 0.3 * rng.normal(size=n)
    content = np.where(same_phrase, 0.8, 0.1) + 0.1 * rng.normal(size=n)
    features = {
        "speaker": speaker,
        "phrase": np.minimum(phrase, 0),
        "content": content,
        "log_test_duration": log_test,
        "log_enrol_duration": np.log(rng.uniform(5.0, 8.0, size=n)),
    }
    return TrialScores(features, np.ones(n, bool)), conditions


def _calibration(fusion, scores, conditions):
    """``(actDCF, Cllr)`` of the fused LLRs of ``scores``."""
    llr = fused_llr({**fusion, "kind": "llr"}, scores.features, scores.known)
    targets = conditions == "TC"
    return actual_dcf(llr[targets], llr[~targets], 0.01, 10, 1), cllr(llr[targets], llr[~targets])


def test_a_duration_the_scores_depend_on_calibrates_held_out_trials_better():
    rng = np.random.default_rng(3)
    dev, valid_conditions = _trials_whose_targets_depend_on_duration(rng)
    held_out, conditions = _trials_whose_targets_depend_on_duration(rng)
    plain = learn_fusion(dev, valid_conditions, prior=0.01)
    aware = learn_fusion(dev, valid_conditions, prior=0.01, quality=("duration",))
    assert aware["quality"] == ["duration"] and plain["quality"] == []
    for name, features in calibrations_with(("duration",)).items():
        assert aware[name]["features"] == list(features)
        assert features[-2:] == ("log_test_duration", "log_enrol_duration")
    # A short test's targets score lower: at the same score, it is more likely a target.
    assert aware["phrase"]["weights"][-2] < 0
    plain_dcf, plain_cllr = _calibration(plain, held_out, conditions)
    aware_dcf, aware_cllr = _calibration(aware, held_out, conditions)
    assert aware_cllr < 0.95 * plain_cllr and aware_dcf < plain_dcf


def test_fusions_and_reports_of_other_quality_measures_are_kept_apart(tmp_path, caplog):
    rng = np.random.default_rng(4)
    dev, conditions = _trials_whose_targets_depend_on_duration(rng, n=400)
    path, stamp = tmp_path / "ckpt_none.json", {"checkpoint": "CKPT+1"}
    with caplog.at_level(logging.INFO, logger="recipes.evaluation.fusion"):
        aware = stored_or_learned_fusion(path, dev, conditions, 0.01, stamp, ("duration",))
        plain = stored_or_learned_fusion(path, dev, conditions, 0.01, stamp)
    assert "learning it again" in caplog.text  # stored with "duration": not the plain fusion
    assert aware["stamp"]["quality"] == ["duration"] and plain["stamp"]["quality"] == []
    assert plain["phrase"]["features"] == ["speaker", "phrase", "content"]
    scoring = ScoringSettings(
        output_folder=str(tmp_path), score_norm="none", cohort_top_k=200, fusion="llr",
        fusion_prior=0.01, eval_precision="fp32", loader_options={}, max_eval_seconds=20.0,
        sample_rate=16000, fusion_quality=("duration", "cohort"),
    )  # fmt: skip
    assert report_name("eval", scoring, phrase_scored=True) == "eval_quality-duration-cohort"
    assert report_name("eval", scoring, phrase_scored=False) == "eval"  # no fusion to weight them
    # The default measures keep the plain names (answer.txt); none is tagged too.
    default = dataclasses.replace(scoring, fusion_quality=DEFAULT_QUALITY)
    assert report_name("eval", default, phrase_scored=True) == "eval"
    plain = dataclasses.replace(scoring, fusion_quality=())
    assert report_name("eval", plain, phrase_scored=True) == "eval_quality-none"
    # The score file lists the quality features after the others.
    trials = pd.DataFrame({"model_id": "m", "test_id": "t", "label": "x", "condition": conditions})
    write_report(tmp_path, "valid_duration", trials, fused_llr({**aware, "kind": "llr"},
                 dev.features), {}, parts=dev)  # fmt: skip
    columns = pd.read_csv(tmp_path / "scores_valid_duration.txt", sep=" ", header=None)
    assert columns.shape[1] == 3 + 5 + 2
    assert columns[6].to_numpy() == pytest.approx(dev.features["log_test_duration"], abs=1e-4)
