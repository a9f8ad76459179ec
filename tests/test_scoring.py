"""Enrollment models and trial scoring on hand-made embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recipes.evaluation.scoring import (
    EmbeddingTable,
    cosine_trial_scores,
    metrics_by_condition,
    score_trials,
)


def _table():
    return EmbeddingTable.from_dict(
        {
            "e1": [2.0, 0.0],  # norms differ: models average *normalized* vectors
            "e2": [0.0, 1.0],
            "e3": [1.0, 0.0],
            "t1": [1.0, 1.0],
            "t2": [-3.0, 0.0],
        }
    )


def test_model_is_mean_of_normalized_enrollments_and_score_is_cosine():
    models = pd.DataFrame({"model_id": ["m"], "enrol_ids": ["e1 e2"]})
    trials = pd.DataFrame({"model_id": ["m", "m"], "test_id": ["t1", "t2"]})
    scores = score_trials(_table(), models, trials)
    # mean of (1,0) and (0,1) is along (1,1): cosine 1 with t1, -1/sqrt(2) with t2.
    assert scores == pytest.approx([1.0, -1 / np.sqrt(2)])


def test_dense_and_sparse_paths_agree():
    rng = np.random.default_rng(0)
    tests = EmbeddingTable([f"t{i}" for i in range(50)], rng.normal(size=(50, 8)))
    models = EmbeddingTable([f"m{i}" for i in range(40)], rng.normal(size=(40, 8)))
    models.matrix /= np.linalg.norm(models.matrix, axis=1, keepdims=True)
    m_ids = [f"m{i}" for i in rng.integers(0, 40, 30)]
    t_ids = [f"t{i}" for i in rng.integers(0, 50, 30)]
    m_rows, t_rows = models.rows(m_ids, "model"), tests.rows(t_ids, "test")
    sparse = cosine_trial_scores(models, tests, m_rows, t_rows)  # 40*50 > 4*30: row-wise path
    dense = cosine_trial_scores(models, tests, np.tile(m_rows, 100), np.tile(t_rows, 100))[:30]
    expected = [
        models.matrix[int(m[1:])]
        @ tests.matrix[int(t[1:])]
        / np.linalg.norm(tests.matrix[int(t[1:])])
        for m, t in zip(m_ids, t_ids, strict=True)
    ]
    assert sparse == pytest.approx(expected, abs=1e-6) and dense == pytest.approx(
        expected, abs=1e-6
    )


def test_unknown_ids_are_named():
    models = pd.DataFrame({"model_id": ["m"], "enrol_ids": ["e1 nope"]})
    trials = pd.DataFrame({"model_id": ["m"], "test_id": ["t1"]})
    with pytest.raises(KeyError, match="nope"):
        score_trials(_table(), models, trials)
    trials = pd.DataFrame({"model_id": ["zz"], "test_id": ["t1"]})
    with pytest.raises(KeyError, match="zz"):
        score_trials(_table(), models, trials)


def test_metrics_by_condition_pairs():
    scores = [0.9, 0.8, 0.7, 0.85, 0.1, 0.2]
    conditions = ["TC", "TC", "TW", "IC", "IW", "IW"]
    result = metrics_by_condition(scores, conditions)
    assert set(result) == {"pooled", "TC-vs-IC", "TC-vs-TW", "TC-vs-IW"}
    assert result["TC-vs-IW"]["eer"] == 0.0 and result["TC-vs-TW"]["eer"] == 0.0
    assert result["TC-vs-IC"]["eer"] == 50.0  # 0.85 sits between the two targets
    assert result["pooled"]["nontargets"] == 4 and result["pooled"]["targets"] == 2


def test_save_and_load_round_trip(tmp_path):
    table = _table()
    table.save(tmp_path / "emb")
    again = EmbeddingTable.load(tmp_path / "emb")
    assert again.ids == table.ids and np.array_equal(again.matrix, table.matrix)


def test_s_norm_and_as_norm_standardize_each_side():
    from recipes.evaluation.scoring import cohort_statistics, normalize_trial_scores

    rng = np.random.default_rng(0)
    cohort = rng.normal(size=(30, 4))
    models, tests = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    m_rows, t_rows = np.array([0, 1, 2, 0]), np.array([4, 3, 2, 0])
    raw = np.array([0.3, -0.1, 0.5, 0.9])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    for method, k in (("s-norm", None), ("as-norm", 7)):
        out = normalize_trial_scores(raw, models, tests, m_rows, t_rows, cohort, method, 7)
        for i, (m, t) in enumerate(zip(m_rows, t_rows, strict=True)):
            ms = np.sort(unit(models[m : m + 1]) @ unit(cohort).T)[0][::-1]
            ts = np.sort(unit(tests[t : t + 1]) @ unit(cohort).T)[0][::-1]
            ms, ts = (ms[:k], ts[:k]) if k else (ms, ts)
            expected = 0.5 * ((raw[i] - ms.mean()) / ms.std() + (raw[i] - ts.mean()) / ts.std())
            assert out[i] == pytest.approx(expected)
    mean, std = cohort_statistics(models, cohort, None)
    assert mean.shape == std.shape == (3,)
    with pytest.raises(ValueError, match="score_norm"):
        normalize_trial_scores(raw, models, tests, m_rows, t_rows, cohort, "z-norm", 7)
