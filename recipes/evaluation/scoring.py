"""Enrollment models, cosine scoring, metrics by trial condition (docs/design.md section 5).

Shared by the training recipe (its validation pass) and ``verify_speakers.py``.

- An enrollment model is the mean of its L2-normalized enrollment embeddings.
- A trial's score is the cosine between its model and its test embedding. All trials are scored
  at once: a matrix product over the unique models and tests when the trial list is dense
  (validation trials are all pairs), else one row-wise product per trial in chunks; never a
  Python loop.
- Optional s-norm / AS-norm against a cohort of training speakers.
- The official result pools TC (the only targets) against all non-targets (TW, IC, IW); the pairs
  TC-vs-IC, TC-vs-TW and TC-vs-IW show which kind of impostor hurts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from recipes.evaluation.metrics import verification_metrics
from recipes.model.trial_decisions import top_cohort_cosines

CONDITION_PAIRS = {
    "pooled": ("TW", "IC", "IW", "NT"),  # NT: a non-target of a key that gives no type
    "TC-vs-IC": ("IC",),
    "TC-vs-TW": ("TW",),
    "TC-vs-IW": ("IW",),
}


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class EmbeddingTable:
    """Embeddings by utterance id: an id list and a float32 matrix, saved as ``.npy`` + ``.txt``."""

    def __init__(self, ids, matrix):
        self.ids = list(ids)
        self.matrix = np.asarray(matrix, dtype=np.float32)
        self.lookup = pd.Index(self.ids)
        if not self.lookup.is_unique or self.matrix.shape[0] != len(self.ids):
            raise ValueError("embedding ids must be unique and match the matrix rows")

    @classmethod
    def from_dict(cls, embeddings: dict) -> EmbeddingTable:
        """From ``{id: vector}``."""
        ids = list(embeddings)
        return cls(ids, np.stack([np.asarray(embeddings[i], dtype=np.float32) for i in ids]))

    def rows(self, ids, what: str) -> np.ndarray:
        """Row numbers of ``ids``; a clear error naming unknown ones.

        One vectorized hash lookup (pandas): a Python loop over a million trial ids took seconds.
        """
        rows = self.lookup.get_indexer(pd.Index(ids))
        if (rows < 0).any():
            missing = list(dict.fromkeys(np.asarray(ids, dtype=object)[rows < 0]))
            raise KeyError(f"{len(missing)} {what} id(s) have no embedding, e.g. {missing[:5]}")
        return rows.astype(np.int64)

    def save(self, prefix) -> None:
        """Write ``prefix.npy`` and ``prefix.ids.txt``."""
        np.save(f"{prefix}.npy", self.matrix)
        with open(f"{prefix}.ids.txt", "w", encoding="utf-8") as handle:
            handle.write("\n".join(self.ids) + "\n")

    @classmethod
    def load(cls, prefix) -> EmbeddingTable:
        """Read what ``save`` wrote."""
        with open(f"{prefix}.ids.txt", encoding="utf-8") as handle:
            ids = handle.read().split()
        return cls(ids, np.load(f"{prefix}.npy"))


def group_means(vectors: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Unit vector per group: the mean of the group's L2-normalized ``vectors``.

    The sums are one sparse (groups x vectors) product: ``np.add.at`` took 2.7 s for 60k vectors.
    """
    membership = sparse.csr_matrix(
        (np.ones(len(groups)), (groups, np.arange(len(groups)))), shape=(n_groups, len(groups))
    )
    return l2_normalize(np.asarray(membership @ l2_normalize(vectors).astype(np.float64)))


def enrollment_models(table: EmbeddingTable, models: pd.DataFrame) -> EmbeddingTable:
    """One unit vector per model: the mean of its L2-normalized enrollment embeddings."""
    enrol_lists = [ids.split() for ids in models["enrol_ids"]]
    flat = [i for ids in enrol_lists for i in ids]
    owners = np.repeat(np.arange(len(enrol_lists)), [len(ids) for ids in enrol_lists])
    vectors = table.matrix[table.rows(flat, "enrollment")]
    return EmbeddingTable(models["model_id"], group_means(vectors, owners, len(enrol_lists)))


def cosine_trial_scores(
    models: EmbeddingTable, tests: EmbeddingTable, m_rows, t_rows, chunk: int = 1 << 14
) -> np.ndarray:
    """Cosine score of each trial ``(models row m_rows[i], tests row t_rows[i])``, vectorized."""
    unique_m, m_inv = np.unique(m_rows, return_inverse=True)
    unique_t, t_inv = np.unique(t_rows, return_inverse=True)
    test_vectors = l2_normalize(tests.matrix)
    if unique_m.size * unique_t.size <= 4 * len(m_rows):  # dense: one matrix product
        full = models.matrix[unique_m] @ test_vectors[unique_t].T
        return full[m_inv, t_inv].astype(np.float64)
    scores = np.empty(len(m_rows), dtype=np.float64)
    # Chunks small enough to keep the gathered rows in cache (docs/performance.md, "Scoring a
    # million trials from cached embeddings").
    for start in range(0, len(m_rows), chunk):
        end = start + chunk
        scores[start:end] = np.einsum(
            "ij,ij->i", models.matrix[m_rows[start:end]], test_vectors[t_rows[start:end]]
        )
    return scores


def score_trials(
    table: EmbeddingTable,
    models: pd.DataFrame,
    trials: pd.DataFrame,
    cohort: np.ndarray | None = None,
    score_norm: str = "none",
    top_k: int = 200,
) -> np.ndarray:
    """Scores of ``trials`` (model_id, test_id) from utterance embeddings and model definitions.

    With ``score_norm`` "s-norm" or "as-norm", ``cohort`` (one embedding per training speaker)
    normalizes them.
    """
    known = trials["model_id"].isin(models["model_id"]).to_numpy()  # no Python loop over trials
    if not known.all():
        unknown = sorted(set(trials["model_id"][~known]))
        raise KeyError(f"{len(unknown)} trial model id(s) are not enrollment models: {unknown[:5]}")
    model_table = enrollment_models(table, models)
    m_rows = model_table.rows(trials["model_id"], "model")
    t_rows = table.rows(trials["test_id"], "test")
    scores = cosine_trial_scores(model_table, table, m_rows, t_rows)
    if score_norm == "none":
        return scores
    if cohort is None:
        raise ValueError(f"score_norm {score_norm!r} needs a cohort of training speakers")
    return normalize_trial_scores(
        scores, model_table.matrix, table.matrix, m_rows, t_rows, cohort, score_norm, top_k
    )


def condition_pair(scores, conditions, impostors) -> tuple[np.ndarray, np.ndarray]:
    """Target (TC) scores and the non-target scores of the ``impostors`` conditions."""
    scores, conditions = np.asarray(scores), np.asarray(conditions)
    return scores[conditions == "TC"], scores[np.isin(conditions, impostors)]


def metrics_by_condition(scores, conditions, llr: bool = False) -> dict:
    """EER / minDCF for the pooled condition and each TC-vs-X pair (skipped where X is absent).

    With ``llr`` (calibrated scores), also actual DCF and Cllr.
    """
    results = {}
    for name, impostors in CONDITION_PAIRS.items():
        targets, nontargets = condition_pair(scores, conditions, impostors)
        if targets.size and nontargets.size:
            labels = np.r_[np.ones(targets.size, bool), np.zeros(nontargets.size, bool)]
            results[name] = verification_metrics(np.r_[targets, nontargets], labels, llr)
    return results


def labelled(trials: pd.DataFrame) -> bool:
    """Whether every trial has a condition (a key labels the list); else the list is blind."""
    return bool((trials["condition"] != "").all())


def trial_metrics(scores, trials: pd.DataFrame, llr: bool = False) -> dict:
    """``metrics_by_condition`` of labelled trials; ``{}`` for a blind (unlabelled) list."""
    if not labelled(trials):
        return {}
    return metrics_by_condition(scores, trials["condition"], llr)


# ------------------------------------------------------------------------------------------------
# Score normalization with a cohort of training speakers: s-norm and adaptive s-norm (AS-norm), as
# in SpeechBrain's verification_ecapa.yaml. Each side of a trial (model, test) is scored against
# the cohort; the trial score is standardized with the mean and std of those cohort scores (all
# of them for s-norm, the top-k closest for AS-norm) and the two standardized scores averaged.
# The challenge forbids using other trials' data, so the cohort holds training speakers only.
# ------------------------------------------------------------------------------------------------


def cohort_statistics(vectors: np.ndarray, cohort: np.ndarray, top_k: int | None):
    """Mean and std of each row's cosine scores against the cohort (its top-k when given)."""
    scores = top_cohort_cosines(vectors, cohort, top_k)
    return scores.mean(axis=1), np.maximum(scores.std(axis=1), 1e-6)


METHODS = ("none", "s-norm", "as-norm")


def normalize_trial_scores(scores, models, tests, model_rows, test_rows, cohort, method, top_k):
    """Normalize trial scores; cohort statistics are computed once per model and per test.

    ``models`` / ``tests`` hold one embedding per row; trial i pairs ``models[model_rows[i]]``
    with ``tests[test_rows[i]]``.
    """
    if method not in METHODS[1:]:
        raise ValueError(f"score_norm must be one of {METHODS}, not {method!r}")
    k = top_k if method == "as-norm" else None
    model_mean, model_std = cohort_statistics(models, cohort, k)
    test_mean, test_std = cohort_statistics(tests, cohort, k)
    return 0.5 * (
        (scores - model_mean[model_rows]) / model_std[model_rows]
        + (scores - test_mean[test_rows]) / test_std[test_rows]
    )
