"""Text-dependent trial decisions with numbers only: no torch, no SpeechBrain, no repository.

A trial is a target only when the enrolled speaker says the enrolled pass-phrase. From a model's
outputs per utterance (speaker embedding, phrase log-posteriors and phrase embedding, as numpy
arrays or CPU tensors), this file computes a trial's named features (``TRIAL_FEATURES``, and the
quality measures ``QUALITY_MEASURES``), the calibrated LLR of the fusion (``fused_llr``) and the
decision with its reason (``TrialDecisions.score_trial``).

One implementation for every backend: the SpeechBrain folder (``TDSVSpeakerRecognition`` in
``speaker_model.py``), the ONNX one (``onnx_verifier.py``, torch-free) and the recipe's scoring
(``recipes/evaluation/fusion.py`` learns the calibrations applied here). ``recipes/export_model.py``
inlines it into both backends' files of every exported folder (``pretrained.exported_source``),
so each is one self-contained file: keep its top-level names apart from theirs (checked).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np
import soundfile

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# A trial is a target only when the enrolled speaker says the enrolled
# pass-phrase. ``recipes/evaluation/fusion.py`` learns, on the dev trials, affine maps from named
# trial features (``TRIAL_FEATURES``) to calibrated log-likelihood ratios (``CALIBRATIONS``); they
# are applied here, with numbers only, so that an exported folder needs no scikit-learn and no
# repository.
# ------------------------------------------------------------------------------------------------
#: The phrase class of free-text training utterances (``include_free_text``).
OTHER_PHRASE = "other"
#: How fused decisions are made: "llr" (calibrated fusion), "gate" (speaker LLR, hard phrase
#: reject); the ``fusion`` setting is one of these or "none" (speaker scores, no fusion).
DECISION_KINDS = ("llr", "gate")
#: What ``fused_llr`` computes: a decision kind, or "speaker" (the speaker score calibrated alone).
FUSION_KINDS = (*DECISION_KINDS, "speaker")
#: The scores of a trial a fusion weights, by name, in the order reports list them: "speaker",
#: the cosine of enrollment model and test (score-normalized if configured); "phrase", the phrase
#: branch's log-posterior of the enrolled phrase (``phrase_feature``); "content", the cosine of
#: the enrollment's and the test's phrase embeddings.
TRIAL_FEATURES = ("speaker", "phrase", "content")
#: The affine calibrations a fusion learns and the features each weights: "phrase" for trials whose
#: enrolled phrase is a class of the phrase classifier, "content" for the others (a user's own
#: pass-phrase), "speaker" the speaker score alone (the gate, the reason of a reject). A new feature
#: is named in ``TRIAL_FEATURES`` and here, and computed in ``FEATURE_FORMULAS``: learning,
#: applying, the stored fusion, the verdicts and the reports follow the names.
CALIBRATIONS = {
    "phrase": ("speaker", "phrase", "content"),
    "content": ("speaker", "content"),
    "speaker": ("speaker",),
}
#: Quality measures a fusion may also weight (``fusion_quality``), each a pair of trial features:
#: "duration", the log seconds of the test and of the whole enrollment (as scored: capped at
#: ``max_eval_seconds``); "cohort", the mean of the test's and of the enrollment model's top-k
#: cosines against the training speakers (``cohort_top_k``): how crowded its neighbourhood is.
#: Calibration of short pass-phrase trials depends on both (docs/design.md section 6). A new one
#: is named here and computed in ``quality_values``, for a list of trials and for one trial.
QUALITY_MEASURES = {
    "duration": ("log_test_duration", "log_enrol_duration"),
    "cohort": ("test_cohort_mean", "model_cohort_mean"),
}
#: The measures both training YAMLs weight (``fusion_quality``), chosen by the measurement in
#: docs/design.md section 6; reports of other measures are tagged (``verification.quality_tag``).
DEFAULT_QUALITY = ("cohort",)


def unit_rows(x) -> np.ndarray:
    """Rows scaled to unit length (float64; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top_cohort_cosines(vectors, cohort, top_k: int | None) -> np.ndarray:
    """Each row's cosines against the cohort's rows, only its ``top_k`` highest (None: all).

    The cohort measure's input here and in an exported folder, and AS-norm's in the recipe.
    """
    scores = unit_rows(vectors) @ unit_rows(cohort).T
    if top_k is not None and top_k < scores.shape[1]:
        scores = -np.partition(-scores, top_k - 1, axis=1)[:, :top_k]
    return scores


def quality_features(quality) -> tuple[str, ...]:
    """The trial features of the quality measures ``quality`` (names of ``QUALITY_MEASURES``)."""
    unknown = [name for name in quality if name not in QUALITY_MEASURES]
    if unknown:
        raise ValueError(f"fusion_quality: {unknown} not in {', '.join(QUALITY_MEASURES)}")
    return tuple(feature for name in quality for feature in QUALITY_MEASURES[name])


def quality_values(
    measures, model_side: dict, test_side: dict, trial_rows, cohort=None, top_k=None
):
    """The features of the quality measures ``measures`` (``QUALITY_MEASURES``) of trials.

    The one implementation for a split's trials (``recipes.evaluation.fusion``) and for one trial
    (``TrialDecisions.trial_features``: a list of one). ``model_side`` / ``test_side`` hold one
    row per enrollment model / test utterance: "seconds" (as scored, the whole enrollment's for a
    model; "duration") and "speaker" (embeddings, the model's mean; "cohort"). ``trial_rows``:
    each trial's ``(model rows, test rows)``. The cohort's top-k means are computed once per row,
    not per trial.
    """
    model_rows, test_rows = trial_rows
    features = {}
    if "duration" in measures:
        features["log_test_duration"] = np.log(np.asarray(test_side["seconds"], float))[test_rows]
        enrol = np.asarray(model_side["seconds"], float)
        features["log_enrol_duration"] = np.log(enrol)[model_rows]
    if "cohort" in measures:
        if cohort is None:
            raise ValueError("fusion_quality 'cohort' needs the training speakers as a cohort")
        for side, rows, name in ((test_side, test_rows, "test"), (model_side, model_rows, "model")):
            means = top_cohort_cosines(side["speaker"], cohort, top_k).mean(axis=1)
            features[f"{name}_cohort_mean"] = means[rows]
    return {name: np.asarray(features[name], np.float64) for name in quality_features(measures)}


def calibrations_with(quality) -> dict[str, tuple[str, ...]]:
    """``CALIBRATIONS``, each also weighting the features of the quality measures ``quality``."""
    extra = quality_features(quality)
    return {name: (*features, *extra) for name, features in CALIBRATIONS.items()}


#: The feature the phrase gate thresholds in each calibration's trials (fusion "gate").
GATE_FEATURES = {"phrase": "phrase", "content": "content"}
#: Subtracted from the speaker LLR of a trial that the phrase gate rejects (fusion "gate").
GATE_PENALTY = 100.0
#: Phrase log-posteriors are floored here: a target whose phrase the classifier misses should
#: cost a bounded amount of evidence, not an unbounded one (calibration, Cllr).
LOGP_FLOOR = -20.0
#: Operating points of the dev-calibrated thresholds (``export_operating_point``).
OPERATING_POINTS = ("eer", "min_dcf")
#: SdSV / TdSV detection costs: the default operating point of Bayes decisions. This constant and
#: ``bayes_threshold`` are twins of ``recipes.evaluation.metrics.SDSV_DCF`` / ``bayes_threshold``,
#: on purpose: this file is copied into exported folders and must not import the repository.
SDSV_COSTS = {"p_target": 0.01, "c_miss": 10.0, "c_fa": 1.0}


def bayes_threshold(p_target: float, c_miss: float, c_fa: float) -> float:
    """The LLR threshold of minimum expected cost: log(C_fa (1 - P) / (C_miss P))."""
    return math.log(c_fa * (1 - p_target) / (c_miss * p_target))


def phrase_feature(logp, known, content) -> np.ndarray:
    """The "phrase" feature: the floored log-posterior where ``known``, else ``content``.

    ``known[i]``: trial i's enrolled pass-phrase is a class of the phrase classifier; where it is
    not, the phrase score *is* the content similarity (and the "content" calibration applies).
    """
    known = np.asarray(known, bool)
    logp = np.maximum(np.asarray(logp, dtype=np.float64), LOGP_FLOOR)
    return np.where(known, logp, np.asarray(content, dtype=np.float64))


#: How each of ``TRIAL_FEATURES`` is computed from a trial's primitive scores: "speaker" (the
#: cosine of enrollment model and test, score-normalized where configured), "content" (the cosine
#: of their phrase embeddings), "logp" (the phrase branch's log-posterior of the enrolled phrase)
#: and "known" (the enrolled phrase is a class of the phrase classifier), each an array over
#: trials. The one place both paths compute features: a list of trials
#: (``recipes.evaluation.fusion.trial_scores``) and one trial (``TrialDecisions.trial_features``,
#: in the exported folder's two backends too), so a feature added here works on both.
FEATURE_FORMULAS = {
    "speaker": lambda p: p["speaker"],
    "phrase": lambda p: phrase_feature(p["logp"], p["known"], p["content"]),
    "content": lambda p: p["content"],
}


def named_features(primitives: dict) -> dict:
    """``TRIAL_FEATURES`` (``FEATURE_FORMULAS``) of trials from their primitive scores (arrays).

    Without the phrase branch's primitives (``content``, ``logp``, ``known``): "speaker" alone.
    """
    names = TRIAL_FEATURES if "content" in primitives else ("speaker",)
    return {name: np.asarray(FEATURE_FORMULAS[name](primitives), np.float64) for name in names}


def calibrated(calibration: dict, features) -> np.ndarray:
    """An affine calibration (``{"features", "weights", "bias"}``) of named trial features."""
    weighted = [
        w * np.asarray(features[name], dtype=np.float64)
        for name, w in zip(calibration["features"], calibration["weights"], strict=True)
    ]
    return calibration["bias"] + np.sum(weighted, axis=0)


def fused_llr(fusion: dict, features, known=None, kind=None) -> np.ndarray:
    """Calibrated LLRs of trials from their named ``features`` (``TRIAL_FEATURES``).

    ``known[i]`` (default: all) says that trial i's enrolled pass-phrase is a class of the phrase
    classifier: the "phrase" calibration applies, else the "content" one (``CALIBRATIONS``).
    ``kind`` (default ``fusion["kind"]``): "llr", "gate" or "speaker" (the speaker score alone,
    calibrated).
    """
    kind = kind or fusion["kind"]
    if kind not in FUSION_KINDS:
        raise ValueError(f"fusion kind must be one of {FUSION_KINDS}, not {kind!r}")
    speaker = calibrated(fusion["speaker"], features)
    if kind == "speaker":
        return speaker
    known = np.ones(speaker.shape, bool) if known is None else np.asarray(known, bool)
    if kind == "llr":
        return np.where(
            known, calibrated(fusion["phrase"], features), calibrated(fusion["content"], features)
        )
    gate = fusion["gate_threshold"]
    gated = np.where(known, features[GATE_FEATURES["phrase"]], features[GATE_FEATURES["content"]])
    below = gated < np.where(known, gate["phrase"], gate["content"])
    return speaker - GATE_PENALTY * below


class Verdict(NamedTuple):
    """The outcome of one text-dependent trial (``TDSVSpeakerRecognition.verify_trial``)."""

    speaker_score: float  # cosine of enrollment model and test embedding
    phrase_score: float | None  # the "phrase" feature: floored log-posterior, or content similarity
    content_score: float | None  # content similarity of enrollment and test (phrase embeddings)
    score: float  # what the decision thresholds: the fused LLR, or the cosine without a fusion
    threshold: float | None
    accept: bool | None  # None: no threshold given or calibrated
    reason: str  # why a trial was rejected: "wrong pass-phrase", "speaker", or ""
    phrase: str | None  # the enrolled pass-phrase the test was checked against ("custom": none)
    notes: tuple = ()  # what to know about its audio, e.g. "test upsampled from 8 kHz"
    features: dict | None = None  # every named feature the fusion weighed (TRIAL_FEATURES, quality)


def band_notes(enrol_outputs, test_outputs) -> tuple[str, ...]:
    """Notes of a trial whose files were below the model's sample rate (``"upsampled_from"``).

    Upsampling adds no bandwidth: an 8 kHz file lacks the 4-8 kHz band the model was trained and
    calibrated with, so its scores are not those of 16 kHz speech (docs/guide.md).
    """
    notes = []
    test = test_outputs.get("upsampled_from")
    if test:
        notes.append(f"test upsampled from {test / 1000:g} kHz")
    enrol = [o["upsampled_from"] for o in enrol_outputs if o.get("upsampled_from")]
    if enrol:
        notes.append(
            f"{len(enrol)} of {len(enrol_outputs)} enrollment file(s) upsampled from "
            f"{min(enrol) / 1000:g} kHz"
        )
    return tuple(notes)


class AudioRefused(ValueError):
    """An audio file (named in the message) that cannot be scored: never a score, never accepted."""


def audio_refusal(wav, sample_rate: int, min_seconds: float) -> str | None:
    """Why a mono waveform (any array: numpy, a CPU tensor) cannot be scored, or None.

    Too short, non-finite, or no signal: the same checks, levels and wording as
    ``data_prep/audio_checks.py`` (tested to agree); a twin on purpose: an exported folder carries
    this file, not the repository.
    """
    wav = np.asarray(wav).reshape(-1)
    if wav.size < min_seconds * sample_rate:
        return f"too short ({wav.size / sample_rate:.3f} s, minimum {min_seconds} s)"
    finite = np.isfinite(wav)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        return (
            f"{int((~finite).sum())} non-finite sample(s) (NaN or inf), the first at "
            f"{first / sample_rate:.3f} s"
        )
    frame = max(1, int(0.025 * sample_rate))
    frames = wav[: wav.size // frame * frame].astype(np.float64).reshape(-1, frame)
    power = float(((frames - frames.mean(1, keepdims=True)) ** 2).mean(1).max())
    loudest = 10 * math.log10(max(power, 1e-20))
    if loudest < -60:
        return (
            f"no speech energy (silence): the loudest 25 ms frame is at {loudest:.0f} dBFS, "
            "below -60 dBFS"
        )
    return None


def scorable_waveform(path, wav, sample_rate: int, settings, changes: list[str]):
    """``wav`` (mono, at ``sample_rate``), cut at ``settings.max_eval_seconds``, or refused.

    ``changes`` already made to the file's audio (resampled, down-mixed) are logged with the
    cut, naming ``path``; a waveform that ``audio_refusal`` refuses (``settings``'
    ``min_audio_seconds``) raises ``AudioRefused``. Both backends load audio through this.
    """
    limit = getattr(settings, "max_eval_seconds", None)
    if limit and wav.shape[0] > limit * sample_rate:
        changes = [
            *changes,
            f"cut from {wav.shape[0] / sample_rate:.1f} s to {limit} s (max_eval_seconds)",
        ]
        wav = wav[: int(limit * sample_rate)]
    if changes:
        logger.warning("%s: %s", path, ", ".join(changes))
    refusal = audio_refusal(wav, sample_rate, getattr(settings, "min_audio_seconds", 0.3))
    if refusal:
        raise AudioRefused(f"{path}: {refusal}")
    return wav


def vectors(rows) -> np.ndarray:
    """A stack of per-utterance vectors (numpy arrays or CPU tensors) as float64 ``[N, D]``."""
    return np.stack([np.asarray(row, dtype=np.float64).reshape(-1) for row in rows])


def enrolment_model(embeddings) -> np.ndarray:
    """Unit vector ``[D]``: the mean of the L2-normalized embeddings ``[N, D]``."""
    return unit_rows(unit_rows(embeddings).mean(axis=0))


def cosine(a, b) -> float:
    """The cosine of two vectors."""
    a, b = unit_rows(vectors([a, b]))
    return float(a @ b)


# ------------------------------------------------------------------------------------------------
# A model folder's decision data, checked on load by every backend: a number that is not finite
# (a threshold, a fusion weight, a cost) would decide every trial the same way with exit 0.
# ------------------------------------------------------------------------------------------------
class DecisionDataError(ValueError):
    """A model folder's decision data that no decision may be made with (file and keys named)."""


#: The decision data of an exported folder: the keys of its ``hyperparams.yaml`` that both
#: backends decide with (the one place they are kept; users may edit them there).
DECISION_KEYS = (
    "sample_rate", "max_eval_seconds", "min_audio_seconds", "operating_point", "thresholds",
    "phrase_labels", "fusion", "costs", "cohort_top_k",
)  # fmt: skip
#: The training speakers of the quality measure "cohort" in an exported folder: a NumPy array
#: ``[S, D]`` (``.npy`` format), named as SpeechBrain's Pretrainer fetches a loadable.
COHORT_FILE = "cohort.ckpt"


def read_cohort(path) -> np.ndarray:
    """The cohort array of an export (``COHORT_FILE``): numbers only, a damaged file named."""
    try:
        cohort = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:  # missing, truncated, or an object array
        raise DecisionDataError(f"{path}: not a readable array of numbers ({error})") from None
    if not isinstance(cohort, np.ndarray):  # an .npz or zip archive (a torch checkpoint)
        raise DecisionDataError(f"{path}: not a NumPy array file (.npy format)")
    return cohort


def _finite(value) -> bool:
    """True for a finite int or float (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _calibration_problems(name: str, calibration, allowed: set) -> list[str]:
    """What is wrong with one affine calibration of a fusion (``calibrated``'s input)."""
    if not isinstance(calibration, dict):
        return [f"fusion.{name}: missing, or not a mapping"]
    features, weights = calibration.get("features"), calibration.get("weights")
    problems = []
    if not isinstance(features, list) or not set(features) <= allowed:
        problems.append(f"fusion.{name}.features {features!r}: names of {sorted(allowed)}")
    if not isinstance(weights, list) or not all(map(_finite, weights)):
        problems.append(f"fusion.{name}.weights {weights!r}: a list of finite numbers")
    elif isinstance(features, list) and len(weights) != len(features):
        problems.append(f"fusion.{name}: {len(weights)} weights for {len(features)} features")
    if not _finite(calibration.get("bias")):
        problems.append(f"fusion.{name}.bias {calibration.get('bias')!r}: a finite number")
    return problems


def _fusion_problems(fusion, values) -> list[str]:
    """What is wrong with a stored fusion (``fused_llr``'s ``fusion``)."""
    if not isinstance(fusion, dict):
        return [f"fusion {fusion!r}: a mapping or null"]
    problems = []
    if fusion.get("kind") not in DECISION_KINDS:
        problems.append(f"fusion.kind {fusion.get('kind')!r}: one of {DECISION_KINDS}")
    quality = fusion.get("quality", [])
    if not isinstance(quality, list) or not set(quality) <= set(QUALITY_MEASURES):
        problems.append(f"fusion.quality {quality!r}: names of {sorted(QUALITY_MEASURES)}")
        quality = []
    allowed = {*TRIAL_FEATURES, *quality_features(quality)}
    for name in CALIBRATIONS:
        problems += _calibration_problems(name, fusion.get(name), allowed)
    gate = fusion.get("gate_threshold")
    if fusion.get("kind") == "gate" and not (
        isinstance(gate, dict) and all(_finite(gate.get(name)) for name in GATE_FEATURES)
    ):
        problems.append(f"fusion.gate_threshold {gate!r}: finite phrase and content thresholds")
    labels = values.get("phrase_labels")
    if not isinstance(labels, list) or not labels:
        problems.append(f"phrase_labels {labels!r}: the phrase classes a fusion needs")
    top_k = values.get("cohort_top_k")
    if "cohort" in quality and not (isinstance(top_k, int) and not isinstance(top_k, bool)):
        problems.append(f"cohort_top_k {top_k!r}: a whole number, for the quality measure cohort")
    elif "cohort" in quality and top_k < 1:
        problems.append(f"cohort_top_k {top_k}: at least 1")
    return problems


def decision_problems(values) -> list[str]:
    """What is wrong with a model folder's decision data (``TrialDecisions``' ``hparams``)."""
    problems, get = [], values.get
    rate = get("sample_rate")
    if not (isinstance(rate, int) and not isinstance(rate, bool) and rate > 0):
        problems.append(f"sample_rate {rate!r}: a whole number of Hz")
    cut = get("max_eval_seconds")
    if cut is not None and not (_finite(cut) and cut > 0):
        problems.append(f"max_eval_seconds {cut!r}: a positive number of seconds, or null")
    shortest = get("min_audio_seconds")
    if not (_finite(shortest) and shortest >= 0):
        problems.append(f"min_audio_seconds {shortest!r}: a number of seconds, 0 or more")
    point = get("operating_point")
    if point not in OPERATING_POINTS:
        problems.append(f"operating_point {point!r}: one of {OPERATING_POINTS}")
    thresholds = get("thresholds")  # empty: not calibrated (decisions need a threshold given)
    if not isinstance(thresholds, dict) or (thresholds and point not in thresholds):
        problems.append(f"thresholds: no mapping with the operating point {point!r}")
    else:
        for name, by_count in thresholds.items():
            counts = by_count.items() if isinstance(by_count, dict) else [("?", None)]
            for count, value in counts:  # inf: calibrated to reject all (min_dcf can be)
                number = _finite(value) or (isinstance(value, float) and math.isinf(value))
                if not (str(count).isdigit() and number):
                    problems.append(f"thresholds.{name}.{count} {value!r}: a number, not NaN")
    costs = get("costs")
    if not isinstance(costs, dict) or not all(_finite(costs.get(k)) for k in SDSV_COSTS):
        problems.append(f"costs {costs!r}: finite {', '.join(SDSV_COSTS)}")
    elif not (0 < costs["p_target"] < 1 and costs["c_miss"] > 0 and costs["c_fa"] > 0):
        problems.append(f"costs {costs!r}: p_target in (0, 1), positive c_miss and c_fa")
    labels = get("phrase_labels")
    if labels is not None and not (
        isinstance(labels, list) and all(isinstance(x, str) for x in labels)
        and len(set(labels)) == len(labels)
    ):  # fmt: skip
        problems.append(f"phrase_labels {labels!r}: distinct phrase ids, or null")
    if get("fusion") is not None:
        problems += _fusion_problems(get("fusion"), values)
    return problems


def check_decisions(values, source: str) -> None:
    """Refuse the decision data ``values`` read from ``source`` (a file) if it has problems."""
    problems = decision_problems(values)
    if problems:
        raise DecisionDataError(f"{source}: " + "; ".join(problems))


def check_model_outputs(outputs: dict, values, cohort, source: str) -> None:
    """Refuse decision data that does not fit the model's outputs (one utterance's, ``[D]``).

    The phrase classes must be the phrase branch's outputs, and the cohort (``[S, D]``, the
    quality measure "cohort") finite and as wide as the speaker embedding.
    """
    labels = values.get("phrase_labels")
    problems = []
    if values.get("fusion") is not None and "phrase_logp" not in outputs:
        problems.append("a fusion, but the model has no phrase branch")
    classes = len(outputs["phrase_logp"]) if "phrase_logp" in outputs else None
    if labels is not None and classes is not None and len(labels) != classes:
        problems.append(f"phrase_labels: {len(labels)} labels for {classes} phrase classes")
    quality = (values.get("fusion") or {}).get("quality", [])
    if "cohort" in quality and cohort is None:
        problems.append("the fusion weights the quality measure cohort, and there is no cohort")
    if cohort is not None:
        cohort = np.asarray(cohort)
        width = len(outputs["speaker"])
        if cohort.ndim != 2 or cohort.shape[1] != width:
            problems.append(f"cohort of shape {list(cohort.shape)}: rows of {width} values")
        elif not np.isfinite(cohort).all():
            problems.append(f"cohort: {int((~np.isfinite(cohort)).sum())} non-finite values")
    if problems:
        raise DecisionDataError(f"{source}: " + "; ".join(problems))


class TrialDecisions:
    """Thresholds, pass-phrase checks, trial features and verdicts of an exported model.

    A mixin of the backends: a subclass gives ``self.hparams`` (``thresholds``,
    ``operating_point``; with a fusion also ``phrase_labels``, ``fusion``, ``costs`` and, for
    the quality measure "cohort", ``cohort_top_k``), ``has_fusion()``, ``cohort_matrix()``
    (the training speakers, ``[S, D]``) and ``embed_file_all(path)`` (``{name: vector}``, plus
    ``"seconds"``).
    """

    def threshold(self, n_enrol: int = 1, operating_point: str | None = None) -> float | None:
        """The dev-calibrated threshold for ``n_enrol`` enrollment utterances (None: uncalibrated).

        ``operating_point`` is "eer" or "min_dcf" (default: ``hparams.operating_point``). For more
        enrollment utterances than were calibrated, the largest calibrated count is used.
        """
        count = self.calibrated_count(n_enrol, operating_point)
        if count is None:
            return None
        point = operating_point or self.hparams.operating_point
        return float(self.hparams.thresholds[point][str(count)])

    def calibrated_count(self, n_enrol: int, operating_point: str | None = None) -> int | None:
        """The enrollment count whose threshold ``threshold(n_enrol)`` uses (None: uncalibrated)."""
        table = getattr(self.hparams, "thresholds", None)
        if not table:
            return None
        point = operating_point or self.hparams.operating_point
        if point not in table:
            raise ValueError(f"operating point {point!r}: the model has {sorted(table)}")
        counts = sorted(int(n) for n in table[point])
        return max([n for n in counts if n <= n_enrol] or counts[:1])

    def decide(self, score, n_enrol: int, threshold=None):
        """``score >= threshold`` (None when no threshold is given or calibrated).

        The calibrated threshold for ``n_enrol`` enrollment utterances unless one is given.
        """
        threshold = self.threshold(n_enrol) if threshold is None else threshold
        return None if threshold is None else score >= threshold

    def enrolled_phrase(self, enrol_outputs: list[dict], phrase: str | None = None) -> str:
        """The pass-phrase label to check, or "custom" (content similarity) when it is no class.

        Without ``phrase``, the class with the highest mean posterior over the enrollment
        utterances, when that posterior is at least 0.5 and the class is not "other".
        """
        labels = list(self.hparams.phrase_labels)
        if phrase is not None:
            return self.checked_phrase(phrase)
        logps = vectors([o["phrase_logp"] for o in enrol_outputs])
        recognized = [labels[int(row.argmax())] for row in logps]
        if len(set(recognized)) > 1:
            raise ValueError(
                f"the enrollment files were recognized as different pass-phrases "
                f"({', '.join(recognized)}): enroll one pass-phrase, or name it (--phrase ID, "
                "or custom for a phrase the model was not trained on)"
            )
        posterior = np.exp(logps).mean(axis=0)
        best = int(posterior.argmax())
        if posterior[best] < 0.5 or labels[best] == OTHER_PHRASE:
            return "custom"
        return labels[best]

    def checked_phrase(self, phrase: str) -> str:
        """``phrase`` if it is a pass-phrase of the model or "custom"; else a ValueError.

        An unknown id is refused, not scored as "custom": ``6`` for ``06`` would otherwise
        switch silently to content similarity.
        """
        known = [label for label in self.hparams.phrase_labels if label != OTHER_PHRASE]
        if phrase == "custom" or phrase in known:
            return phrase
        hint = next((f"; did you mean {k!r}?" for k in known if k.lstrip("0") == phrase), "")
        raise ValueError(
            f"phrase {phrase!r} is not a pass-phrase of this model ({', '.join(known)}; or "
            f"custom, for a phrase it was not trained on){hint}"
        )

    def phrase_score(self, test_outputs, phrase: str, content: float) -> float:
        """Log-posterior of ``phrase`` for the test, or the ``content`` similarity for "custom"."""
        if phrase == "custom":
            return content
        index = list(self.hparams.phrase_labels).index(phrase)
        return float(np.asarray(test_outputs["phrase_logp"]).reshape(-1)[index])

    def content_score(self, enrol_outputs, test_outputs) -> float:
        """Cosine of the enrollment's mean phrase embedding and the test's."""
        model = enrolment_model(vectors([o["phrase_embedding"] for o in enrol_outputs]))
        return cosine(model, test_outputs["phrase_embedding"])

    def trial_features(self, enrol_outputs, test_outputs, phrase: str | None) -> dict:
        """The named features (``TRIAL_FEATURES``) of one trial: ``{"speaker": cosine, ...}``.

        With an enrolled ``phrase`` (a class label, or "custom"), also "phrase" and "content";
        and the features of the quality measures the fusion weights (``QUALITY_MEASURES``; the
        cohort is the folder's training speakers, ``cohort_matrix()``).
        """
        model = enrolment_model(vectors([o["speaker"] for o in enrol_outputs]))
        test = vectors([test_outputs["speaker"]])[0]
        primitives = {"speaker": [cosine(model, test)]}  # a list of one trial
        if phrase is not None:
            content = self.content_score(enrol_outputs, test_outputs)
            logp = self.phrase_score(test_outputs, phrase, content)
            primitives.update(content=[content], logp=[logp], known=[phrase != "custom"])
        features = named_features(primitives)
        quality = (getattr(self.hparams, "fusion", None) or {}).get("quality", [])
        if quality:
            enrolled = sum(float(o["seconds"]) for o in enrol_outputs)
            sides = ({"speaker": [model], "seconds": [enrolled]},
                     {"speaker": [test], "seconds": [float(test_outputs["seconds"])]})  # fmt: skip
            cohort = self.cohort_matrix() if "cohort" in quality else None
            top_k = self.hparams.cohort_top_k
            features.update(quality_values(quality, *sides, ([0], [0]), cohort, top_k))
        return {name: float(values[0]) for name, values in features.items()}

    def score_trial(self, enrol_outputs, test_outputs, phrase=None, threshold=None, costs=None):
        """A ``Verdict`` from embedded enrollment files and an embedded test file.

        ``costs`` (``p_target``, ``c_miss``, ``c_fa``) set the Bayes threshold of the LLR
        (default ``hparams.costs``); ``threshold`` overrides it.
        """
        n_enrol = len(enrol_outputs)
        if not self.has_fusion():
            speaker = self.trial_features(enrol_outputs, test_outputs, None)["speaker"]
            threshold = self.threshold(n_enrol) if threshold is None else threshold
            accept = self.decide(speaker, n_enrol, threshold)
            reason = "" if accept or accept is None else "speaker"
            notes = band_notes(enrol_outputs, test_outputs)
            verdict = (speaker, None, None, speaker, threshold, accept, reason, None, notes)
            return Verdict(*verdict, features={"speaker": speaker})
        phrase = self.enrolled_phrase(enrol_outputs, phrase)
        features = self.trial_features(enrol_outputs, test_outputs, phrase)
        fusion = self.hparams.fusion
        llr = float(fused_llr(fusion, features, known=phrase != "custom"))
        if threshold is None:
            chosen = {**SDSV_COSTS, **(getattr(self.hparams, "costs", None) or {}), **(costs or {})}
            threshold = bayes_threshold(**chosen)
        accept = llr >= threshold
        reason = ""
        if not accept:
            speaker_llr = float(fused_llr(fusion, features, kind="speaker"))
            reason = "wrong pass-phrase" if speaker_llr >= threshold else "speaker"
        return Verdict(
            speaker_score=features["speaker"],
            phrase_score=features["phrase"],
            content_score=features["content"],
            score=llr,
            threshold=threshold,
            accept=accept,
            reason=reason,
            phrase=phrase,
            notes=band_notes(enrol_outputs, test_outputs),
            features=features,
        )

    def embed_file_all(self, path) -> dict:
        """``embed_waveform`` of an audio file (``load_audio``).

        Also ``"upsampled_from"``: the file's rate, where it is below the model's (``band_notes``).
        """
        outputs = self.embed_waveform(self.load_audio(path))
        model_rate = getattr(self.hparams, "sample_rate", None)
        if model_rate is None:  # a Hugging Face x-vector folder: its feature extractor's rate
            model_rate = self.audio_normalizer.sample_rate
        rate = soundfile.info(str(path)).samplerate
        if rate < model_rate:
            outputs["upsampled_from"] = rate
        return outputs

    def verify_trial(self, enrol_paths, test_path, phrase=None, threshold=None, costs=None):
        """A ``Verdict`` for a test file against enrollment files (see ``score_trial``)."""
        if not enrol_paths:
            raise ValueError("enrollment needs at least one audio file")
        enrol = [self.embed_file_all(path) for path in enrol_paths]
        return self.score_trial(enrol, self.embed_file_all(test_path), phrase, threshold, costs)
