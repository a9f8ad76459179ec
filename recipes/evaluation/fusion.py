"""Text-dependent scoring: a phrase score per trial, fused with the speaker score into an LLR.

A trial is a target only when the enrolled speaker says the enrolled pass-phrase (TC); the
speaker score alone cannot reject the enrolled speaker saying another phrase (TW). So:

- **Phrase score.** The log-posterior, from the phrase branch, that the test utterance says the
  model's enrolled phrase (as the best SdSV 2020 system did). Not the log-odds: the log-posterior
  saturates at 0 for the right phrase, so it adds no noise to right-phrase trials (TC, IC). For a
  model whose phrase is not a class of the classifier (a user's own pass-phrase), the phrase
  score is the *content similarity* instead: the cosine between the mean phrase embedding of the
  enrollment utterances and the test's.
- **Fusion.** Prior-weighted logistic regressions (scikit-learn), learned on the validation trials,
  map a trial's named features (``trial_decisions.TRIAL_FEATURES``) to a calibrated log-likelihood
  ratio, one per ``trial_decisions.CALIBRATIONS`` entry: for log-posteriors, for content
  similarity, and the speaker score alone (the "gate" fusion and the reason of a reject).
  ``gate``: the calibrated speaker LLR, minus a large penalty when the phrase score is below the
  validation threshold that best separates TC from TW.
- **Quality measures** (``fusion_quality``, ``trial_decisions.QUALITY_MEASURES``): each adds a
  pair of trial features (durations, or cohort neighbourhood) that every calibration also weights
  (``quality_scores``, with ``trial_decisions.quality_values``, which one trial uses too).

The learned numbers are plain JSON (each calibration names its features), applied by
``recipes.model.trial_decisions.fused_llr``, which exported folders carry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.special import logit
from sklearn.linear_model import LogisticRegression
from speechbrain.utils.distributed import if_main_process

from recipes.evaluation.metrics import eer
from recipes.evaluation.scoring import (
    EmbeddingTable,
    enrollment_models,
    score_trials,
)
from recipes.model.trial_decisions import (
    GATE_FEATURES,
    OTHER_PHRASE,
    calibrations_with,
    fused_llr,
    named_features,
    quality_values,
)

logger = logging.getLogger(__name__)

#: Bumped when the way a fusion is learned changes: a stored fusion of another version is relearned.
FUSION_VERSION = 3
#: Non-target trial conditions (wrong phrase, impostor with the right / wrong phrase).
NONTARGET_CONDITIONS = ("TW", "IC", "IW")
#: Inverse regularization of the logistic regressions. Their sample weights sum to 1 (the loss is
#: the prior-weighted mean cross-entropy, whatever the number of trials), so this is a fixed,
#: mild penalty: finite weights when validation separates TC from TW perfectly.
REGULARIZATION_C = 1e4


@dataclass
class TrialScores:
    """The named features (``trial_decisions.TRIAL_FEATURES``) of every trial of one list.

    ``features["speaker"]`` always; with a phrase branch also "phrase" and "content"; and the
    features of the quality measures scored (``quality_scores``).
    ``known[i]``: trial i's enrolled phrase is a class of the phrase classifier.
    """

    features: dict[str, np.ndarray]
    known: np.ndarray | None = None

    @property
    def speaker(self) -> np.ndarray:
        """The speaker scores (the final scores without a fusion)."""
        return self.features["speaker"]

    @property
    def has_phrase(self) -> bool:
        """True when the trials have phrase scores (a model with a phrase branch)."""
        return "phrase" in self.features


def has_phrase_outputs(tables: dict) -> bool:
    """True when the utterance tables hold the phrase branch's outputs."""
    return "phrase_logp" in tables and "phrase_embedding" in tables


def phrase_columns(models: pd.DataFrame, trials: pd.DataFrame, phrase_labels) -> pd.Series:
    """The classifier column of each trial's enrolled phrase (NaN: not a class)."""
    column = {label: i for i, label in enumerate(phrase_labels) if label != OTHER_PHRASE}
    model_phrase = models.set_index("model_id")["phrase_id"]
    return trials["model_id"].map(model_phrase).map(column)


class QualityInputs(NamedTuple):
    """What the quality measures of a split's trials are computed from (``quality_scores``)."""

    measures: tuple[str, ...]  # names of QUALITY_MEASURES
    durations: pd.Series | None = None  # seconds scored per utterance id ("duration")
    cohort: np.ndarray | None = None  # one mean embedding per training speaker ("cohort")
    top_k: int = 200  # the cohort's closest speakers averaged


def quality_scores(speaker: EmbeddingTable, models, trials, inputs: QualityInputs) -> dict:
    """The features of the quality measures ``inputs.measures`` for every trial.

    ``trial_decisions.quality_values`` computes them per enrollment model and per utterance, then
    picks each trial's.
    """
    model_side, test_side = {}, {}
    if "duration" in inputs.measures:
        seconds = inputs.durations
        test_side["seconds"] = seconds.loc[speaker.ids].to_numpy(float)
        enrol = models["enrol_ids"].str.split().map(lambda ids: float(seconds.loc[ids].sum()))
        model_side["seconds"] = enrol.to_numpy(float)
    model_table = enrollment_models(speaker, models)
    model_side["speaker"], test_side["speaker"] = model_table.matrix, speaker.matrix
    rows = (model_table.rows(trials["model_id"], "model"), speaker.rows(trials["test_id"], "test"))
    return quality_values(inputs.measures, model_side, test_side, rows, inputs.cohort, inputs.top_k)


def trial_scores(
    tables: dict[str, EmbeddingTable],
    models: pd.DataFrame,
    trials: pd.DataFrame,
    phrase_labels=None,
    quality: QualityInputs | None = None,
    **norm,
) -> TrialScores:
    """Speaker scores of ``trials`` and, when the tables hold phrase outputs, phrase scores.

    ``norm`` (cohort, score_norm, top_k) goes to ``score_trials`` for the speaker scores;
    ``quality`` adds the features of its quality measures (``quality_scores``).
    """
    speaker = score_trials(tables["speaker"], models, trials, **norm)
    extra = {}
    if quality is not None and quality.measures:
        extra = quality_scores(tables["speaker"], models, trials, quality)
    if not has_phrase_outputs(tables):
        return TrialScores({**named_features({"speaker": speaker}), **extra})
    content = score_trials(tables["phrase_embedding"], models, trials)
    columns = phrase_columns(models, trials, phrase_labels)
    known = columns.notna().to_numpy()
    logp = np.zeros(len(trials))
    if known.any():
        table = tables["phrase_logp"]
        rows = table.rows(trials["test_id"].to_numpy()[known], "test")
        logp[known] = table.matrix[rows, columns.to_numpy()[known].astype(np.int64)]
    primitives = {"speaker": speaker, "content": content, "logp": logp, "known": known}
    return TrialScores({**named_features(primitives), **extra}, known)


def fit_calibration(features: dict, names, conditions, prior: float) -> dict:
    """A prior-weighted logistic regression from the ``names`` of ``features`` to an LLR.

    Targets (TC) count as ``prior`` of the data and non-targets as ``1 - prior``, whatever their
    numbers, so the fitted log-odds are posterior log-odds at that prior and subtracting
    logit(prior) leaves the LLR. Within the non-targets each condition present (TW, IC, IW)
    counts equally: a validation list of all pairs is mostly IW, an evaluation list is not, and the
    calibration should not depend on that mix (docs/design.md section 6). Returns
    ``{"features": names, "weights", "bias"}``.
    """
    conditions = np.asarray(conditions)
    targets = conditions == "TC"
    kinds = [c for c in NONTARGET_CONDITIONS if (conditions == c).any()]
    if not targets.any() or not kinds:
        raise ValueError("calibration needs target (TC) and non-target trials")
    weight = np.where(targets, prior / targets.sum(), 0.0)
    for kind in kinds:
        chosen = conditions == kind
        weight[chosen] = (1 - prior) / len(kinds) / chosen.sum()
    x = np.column_stack([features[name] for name in names]).astype(np.float64)
    model = LogisticRegression(C=REGULARIZATION_C, max_iter=1000)
    model.fit(x, targets, sample_weight=weight)
    bias = float(model.intercept_[0] - logit(prior))
    return {"features": list(names), "weights": [float(w) for w in model.coef_[0]], "bias": bias}


def learn_fusion(scores: TrialScores, conditions, prior: float, quality=()) -> dict:
    """Every calibration of the fusion (``CALIBRATIONS``), learned on labelled (validation) trials.

    Each also weights the features of the quality measures ``quality`` (which ``scores`` must
    hold), and is learned on all the trials, whose phrases are the classifier's own. The gate's
    thresholds (on ``GATE_FEATURES``) are the EER thresholds of TC against TW trials (same
    speaker, right or wrong phrase).
    """
    conditions = np.asarray(conditions)
    targets, wrong_phrase = conditions == "TC", conditions == "TW"
    if not scores.has_phrase:
        raise ValueError("the fusion needs phrase scores: train with phrase_branch: True")
    if not wrong_phrase.any():
        raise ValueError(
            "learning the fusion needs wrong-phrase (TW) trials in the validation list"
        )
    features = scores.features
    calibrations = {
        name: fit_calibration(features, names, conditions, prior)
        for name, names in calibrations_with(quality).items()
    }
    gate = {
        name: eer(features[f][targets], features[f][wrong_phrase])[1]
        for name, f in GATE_FEATURES.items()
    }
    return {
        "prior": prior,
        "quality": list(quality),
        **calibrations,
        "gate_threshold": gate,
        "fitted_on": {"trials": int(targets.size), "targets": int(targets.sum())},
    }


def apply_fusion(fusion: dict, scores: TrialScores, kind: str) -> np.ndarray:
    """The ``kind`` ("llr" or "gate") LLRs of trials."""
    return fused_llr(fusion, scores.features, scores.known, kind)


def scores_digest(scores: TrialScores, conditions: np.ndarray) -> str:
    """A hash of what a fusion is learned from: every trial's features and condition."""
    digest = hashlib.sha1()
    for name in sorted(scores.features):
        digest.update(name.encode() + np.ascontiguousarray(scores.features[name], "<f8").tobytes())
    digest.update("\n".join(map(str, conditions)).encode())
    return digest.hexdigest()


def _stored_fusion(path: Path) -> dict | None:
    """The fusion stored at ``path``; None when there is none, or it is damaged (logged)."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        logger.warning("fusion in %s is damaged (%s): learning it again", path, error)
        return None
    return stored if isinstance(stored, dict) else None


def stored_or_learned_fusion(
    path: Path, valid: TrialScores, conditions, prior: float, stamp: dict, quality=()
):
    """The fusion stored at ``path``, or one learned now (and stored there) if it is stale.

    Stored means learned from the same model and validation trials (``stamp``, the prior, the trial
    counts and a hash of the validation trials' features and conditions: another corpus of the same
    shape is other trials) with the same quality measures, by the same fitting code
    (``FUSION_VERSION``); either way the log says which. A damaged file is learned again, with a
    warning.
    """
    conditions = np.asarray(conditions)
    expected = {**stamp, "version": FUSION_VERSION, "prior": prior, "trials": len(conditions)}
    expected["quality"] = list(quality)
    expected["targets"] = int((conditions == "TC").sum())
    expected["valid_scores"] = scores_digest(valid, conditions)
    stored = _stored_fusion(path)
    if stored is not None:
        if stored.get("stamp") == expected:
            logger.info("fusion: using the one stored in %s", path)
            return stored
        logger.warning("fusion in %s was learned for %s, not %s: learning it again", path,
                       stored.get("stamp"), expected)  # fmt: skip
    fusion = {**learn_fusion(valid, conditions, prior, quality), "stamp": expected}
    if if_main_process():  # every process learns the same numbers; one writes them
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(fusion, indent=2))
        temporary.replace(path)  # never a half-written fusion
    logger.info("fusion: learned on %d validation trials, stored in %s", len(conditions), path)
    return fusion
