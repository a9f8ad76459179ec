#!/usr/bin/env python3
"""Export the best checkpoint of a run as a model folder for SpeechBrain, Hugging Face and ONNX.

    python recipes/export_model.py hparams/export.yaml --output_folder results/synthetic_demo/1986
    python recipes/export_model.py hparams/export.yaml --output_folder results/wavlm_td/1986 \
        --export_folder models/wavlm_td

The run is read from its record (``<output_folder>/hyperparams.yaml``, written by training): the
model, the data and the fusion it was trained and scored with. Writes ``export_folder`` (default
``<output_folder>/export``):

- ``hyperparams.yaml``, ``tdsv_speaker_model.py`` (the model code and the decisions:
  ``recipes/model/speaker_model.py`` with ``trial_decisions.py`` inlined, one self-contained file,
  ``pretrained.exported_source``) and ``embedding_model.ckpt`` (the trained model's state dict,
  as its checkpoint holds it; WavLM built from its config): a SpeechBrain inference folder,
  loaded without this repository with ``foreign_class(source=folder or hub id,
  pymodule_file="tdsv_speaker_model.py", classname="TDSVSpeakerRecognition", savedir=...)``;
- thresholds calibrated on the validation trials (EER and minDCF operating points, for 1 .. N
  enrollment utterances), recorded in ``hyperparams.yaml`` and used by ``verify_files`` by default;
- ``label_encoder.txt`` (the training classes), ``README.md`` (a model card with the metrics of
  this checkpoint on every labelled split: ``evaluation/model_card.py``) and ``export.json`` (the
  same facts, machine-readable); thresholds, fusion and metrics come from the recipe's own
  scoring of the checkpoint (its cached embeddings and stored fusion: ``recipe_calibration``), so
  the card's numbers are the training report's, and nothing is embedded twice;
- ``hf/``: the same model as a ``transformers.WavLMForXVector`` directory (x-vector head only;
  the head's BatchNorm layers are folded into the following layers, so the weights fit HF's
  layout exactly: ``model/hf_xvector.py``);
- ``model.onnx`` and ``model.int8.onnx`` (``export_onnx: true``, ``recipes/onnx_export.py``):
  the same model for onnxruntime, with ``tdsv_onnx_verifier.py``
  (``recipes/model/onnx_verifier.py``, ``trial_decisions.py`` inlined): trials decided with
  onnxruntime, numpy, soundfile and pyyaml alone (``recipes/onnx_trial_example.py``).

The decision data is written once, in ``hyperparams.yaml`` (``trial_decisions.DECISION_KEYS``:
thresholds, fusion, phrase classes, costs, audio limits), and both backends read it there; the
training speakers of the quality measure "cohort" once, in ``cohort.ckpt`` (a NumPy array that
SpeechBrain's Pretrainer fetches like the model's weights, and the ONNX backend reads too).

The export is checked before it is published: loaded as a hub user loads it (a stand-in hub
repository, a ``savedir``, an interpreter that cannot import this repository), the folder must
score a validation trial as it does in place; loaded back, its embeddings of a few validation
utterances must equal those of the trained model, the module training ran (and so must the HF
model's and the ONNX model's). On a seeded sample of validation trials (``check_sample``,
``export_check_trials``) the folder's own model (fp32, one utterance at a time) is compared with
the recipe's scores (reported), the ONNX model with the folder's (to 1e-3, every decision the
same: enforced) and the int8 model with the folder's (reported); ``export_int8_metrics: true``
adds int8's metrics on every labelled split to the model card.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from speechbrain.dataio.dataset import FilteredSortedDynamicItemDataset
from speechbrain.utils.logger import get_logger
from transformers import WavLMForXVector

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.corpus import VALID_SPLIT
from recipes.disk import named_write_failures
from recipes.evaluation.model_card import NO_HF_FOLDER, model_card
from recipes.evaluation.pretrained import (
    EXPORTED_CODE,
    EXPORTED_MODULE,
    embed_dataset,
    exported_source,
    load_verifier,
    score_as_a_hub_user,
)
from recipes.evaluation.scoring import labelled, metrics_by_condition, score_trials, trial_metrics
from recipes.evaluation.verification import (
    ScoringSettings,
    checkpoint_scoring,
    embedded,
    scored_tables,
)
from recipes.experiment import (
    AudioSettings,
    RecipeSettings,
    Split,
    checkpoint_state,
    dataio_prep,
    prepare_data,
)
from recipes.model import speaker_model
from recipes.model.adaptation import merge_lora
from recipes.model.hf_xvector import hf_xvector_model, recipe_input
from recipes.model.onnx_verifier import EXPORT_FACTS, ONNX_INT8_MODEL, OnnxVerifier
from recipes.model.speaker_model import WavLMSpeakerEmbedder, XVectorHead
from recipes.model.trial_decisions import COHORT_FILE, OPERATING_POINTS, SDSV_COSTS
from recipes.onnx_export import (
    MAX_LLR_DIFFERENCE,
    decision_threshold,
    graph_agreement,
    onnx_facts,
    trial_agreement,
    write_onnx_models,
)
from recipes.settings import load_run, load_step

logger = get_logger(__name__)


class ExportSettings(NamedTuple):
    """Where the export goes and what it holds (``hparams/export.yaml``)."""

    folder: Path
    operating_point: str  # the default decision threshold, one of OPERATING_POINTS
    onnx: bool = True  # also model.onnx and model.int8.onnx (``recipes/onnx_export.py``)
    check_trials: int = 2000  # validation trials the folder and ONNX are checked on (a sample)
    int8_metrics: bool = False  # also int8's metrics on every labelled split (embeds them all)


class ExportedRun(NamedTuple):
    """What an export takes from the run's settings (``exported_run``)."""

    settings: RecipeSettings  # the run's data, scoring and model wiring
    head: Callable  # the YAML's constructor of the speaker head (heads[head_type])
    head_type: str
    classifier: Callable  # out_neurons -> the training classifier (for hf/)
    wavlm_source: str
    target_type: str


def exported_run(hparams) -> ExportedRun:
    """The run's settings that an export reads, from its hparams by name."""
    return ExportedRun(
        settings=hparams["recipe_settings"],
        head=hparams["heads"][hparams["head_type"]],
        head_type=hparams["head_type"],
        classifier=hparams["classifier"],
        wavlm_source=hparams["wavlm_source"],
        target_type=hparams["target_type"],
    )


#: The smallest cosine between an exported and the original embedding that passes the check.
MIN_COSINE = 0.9999


# ------------------------------------------------------------------------------------------------
# Calibration and metrics
# ------------------------------------------------------------------------------------------------
def enrolment_thresholds(table, models: pd.DataFrame, trials: pd.DataFrame) -> dict:
    """Validation thresholds ``{"eer": {n: t}, "min_dcf": {n: t}}`` for ``n`` enrollment utterances.

    Scores of a model made of fewer utterances are lower for targets, so one threshold does not
    fit all: each ``n`` is calibrated on the same trials with models made of their first ``n``
    enrollment utterances.
    """
    enrol_lists = models["enrol_ids"].str.split()
    thresholds = {point: {} for point in OPERATING_POINTS}
    for n in range(1, int(enrol_lists.map(len).max()) + 1):
        first_n = models.assign(enrol_ids=enrol_lists.map(lambda ids, n=n: " ".join(ids[:n])))
        pooled = metrics_by_condition(score_trials(table, first_n, trials), trials["condition"])
        if "pooled" not in pooled:
            raise ValueError("the validation trials need targets (TC) and non-targets to calibrate")
        for point in OPERATING_POINTS:
            thresholds[point][n] = round(pooled["pooled"][f"{point}_threshold"], 6)
    return thresholds


def labelled_splits(splits: dict) -> dict:
    """The splits whose trials a key labels: the model card's (a blind list has no metrics).

    The validation split always is; the export embeds no blind list (real TdSV 2024 lists are
    blind: their utterances would be embedded twice more for nothing).
    """
    return {name: s for name, s in splits.items() if labelled(s.trials)}


def split_metrics(scores: dict, splits: dict, fused: bool) -> dict:
    """Metrics by condition of every labelled split from its final scores (the model card's)."""
    results = {}
    for split, final in scores.items():
        metrics = trial_metrics(final, splits[split].trials, llr=fused)
        if metrics:
            results[split] = metrics
    return results


class ExportCalibration(NamedTuple):
    """What an export takes from the recipe's scoring of its checkpoint (``recipe_calibration``)."""

    thresholds: dict  # per operating point and number of enrollment utterances
    fusion: dict | None
    metrics: dict  # per split and condition
    cohort: np.ndarray | None  # mean embedding per training speaker, where the fusion needs it
    scores: dict  # the final score (LLR, or cosine) of every trial, per split


def card_scoring(scoring: ScoringSettings) -> ScoringSettings:
    """The run's scoring as the model card and the checks score: raw (or fused) scores.

    No score normalization (an exported folder has none); the embedding settings are the run's,
    so its cached embeddings serve.
    """
    return dataclasses.replace(scoring, score_norm="none")


def recipe_calibration(scoring: ScoringSettings, data, run) -> ExportCalibration:
    """The ``ExportCalibration`` of ``run``'s checkpoint, from the recipe's own scoring of it.

    ``scoring`` is ``card_scoring``'s. The embeddings are the ones the recipe computed for this
    checkpoint (its cache; embedded here only where missing, as ``run_verification`` would),
    the fusion is the recipe's (read back from ``<output_folder>/fusion/``), and the metrics are
    without score normalization: with ``score_norm: none`` they are the training report's, for
    the same checkpoint and fusion.
    """
    splits = labelled_splits(data.splits)
    tables, cohort = embedded(run.embed, scoring, splits, data.cohort, run.tables_cache(scoring))
    valid = splits[VALID_SPLIT]
    thresholds = enrolment_thresholds(tables[VALID_SPLIT]["speaker"], valid.models, valid.trials)
    per_split, fusion = scored_tables(tables, cohort, scoring, splits, run.fusion)
    scores = {name: scored.final for name, scored in per_split.items()}
    metrics = split_metrics(scores, splits, fused=fusion is not None)
    return ExportCalibration(thresholds, fusion, metrics, cohort, scores)


class CheckSample(NamedTuple):
    """The validation trials an export's backends are checked on (``check_sample``)."""

    split: Split  # their models and trials, and only the utterances they use
    positions: np.ndarray  # of its trials among the validation split's


def check_sample(valid: Split, trials: int, seed: int) -> CheckSample:
    """A seeded sample of about ``trials`` validation trials that needs few utterances.

    Models and test utterances are shuffled (``seed``); trials are taken in the order of a
    rank, either the model's alone (whole models, for lists that test each model on a few
    utterances) or the larger of the model's and the test's, grown together (a grid, for lists
    that test every model on every utterance), whichever needs fewer utterances. Its cost is
    bounded whatever the size of the validation split (``export_check_trials``).
    """
    rng = np.random.default_rng(seed)
    enrol_counts = valid.models.set_index("model_id")["enrol_ids"].str.split().map(len)
    model_rank = pd.Series(rng.permutation(len(enrol_counts)), enrol_counts.index)
    tests = valid.trials["test_id"].unique()
    test_rank = pd.Series(rng.permutation(len(tests)), tests)
    by_model = valid.trials["model_id"].map(model_rank).to_numpy()
    by_test = valid.trials["test_id"].map(test_rank).to_numpy()
    per_model = float(enrol_counts.mean())
    candidates = (by_model, np.maximum(by_model * per_model, by_test))
    samples = [_first_trials(valid, order, trials) for order in candidates]
    return min(samples, key=lambda sample: len(sample.split.utterances))


def _first_trials(valid: Split, rank: np.ndarray, trials: int) -> CheckSample:
    """The validation trials whose ``rank`` is among the ``trials`` smallest (ties kept)."""
    cut = np.sort(rank)[min(trials, rank.size) - 1]
    chosen = rank <= cut
    sample_trials = valid.trials[chosen]
    models = valid.models[valid.models["model_id"].isin(set(sample_trials["model_id"]))]
    ids = set(models["enrol_ids"].str.split().explode()) | set(sample_trials["test_id"])
    utterances = FilteredSortedDynamicItemDataset(valid.utterances, sorted(ids))
    return CheckSample(Split(utterances, models, sample_trials), np.flatnonzero(chosen))


# ------------------------------------------------------------------------------------------------
# The embedding model
# ------------------------------------------------------------------------------------------------
#: Config entries that describe where a model came from, not what it is.
BOOKKEEPING = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype")


def encoder_settings(model: WavLMSpeakerEmbedder) -> dict:
    """``WavLMFromConfig`` arguments that rebuild the model's encoder without its model files."""
    config = model.encoder.model.config.to_diff_dict()
    return {
        "wavlm_config": {k: v for k, v in config.items() if k not in BOOKKEEPING},
        "normalize_wav": bool(model.encoder.normalize_wav),
        "output_all_hiddens": bool(model.encoder.output_all_hiddens),
        "attention": getattr(model.encoder, "attention", "eager"),
    }


def head_spec(constructor) -> tuple[str, dict]:
    """The head's class path inside the export and its constructor arguments.

    ``constructor`` is the YAML's (a ``functools.partial`` of the head's class).
    """
    module, name = constructor.func.__module__, constructor.func.__qualname__
    if module == speaker_model.__name__:
        module = Path(EXPORTED_MODULE).stem
    elif module.split(".")[0] == speaker_model.__name__.split(".")[0]:  # elsewhere in ours
        raise ValueError(f"{module}.{name} is not in {speaker_model.__file__}: cannot export it")
    return f"{module}.{name}", dict(constructor.keywords)


# ------------------------------------------------------------------------------------------------
# Writing and checking the folder
# ------------------------------------------------------------------------------------------------
HYPERPARAMS = """\
# Text-dependent speaker verification model exported by recipes/export_model.py.
# Load it (offline, no repository needed; source: this folder, or its hub repository's id):
#   from speechbrain.inference.interfaces import foreign_class
#   verifier = foreign_class(source="<this folder>", pymodule_file="{module}.py",
#                            classname="TDSVSpeakerRecognition", savedir="pretrained_models/tdsv")
#   score, accept = verifier.verify_files("enrol.wav", "test.wav")
# HyperPyYAML files are code: load only folders you trust.

sample_rate: {sample_rate}
max_eval_seconds: {max_eval_seconds}       # longer test files are cut (logged), as in training
min_audio_seconds: {min_audio_seconds}       # shorter, silent or non-finite files are refused
# verify_* accept a trial when score >= threshold. Thresholds were calibrated on the validation
# trials (speakers unseen in training), per operating point and number of enrollment utterances.
operating_point: {operating_point}          # eer | min_dcf
thresholds: {thresholds}

wavlm_config: {wavlm_config}

# Text-dependent decisions (phrase branch + fusion): verify_trial / verify_enrolment decide on the
# fused log-likelihood ratio at the Bayes threshold of these costs (SdSV / TdSV by default).
phrase_labels: {phrase_labels}
fusion: {fusion}
costs: {costs}

embedding_model: !new:{module}.WavLMSpeakerEmbedder
    encoder: !new:{module}.WavLMFromConfig
        wavlm_config: !ref <wavlm_config>
        normalize_wav: {normalize_wav}
        output_all_hiddens: {output_all_hiddens}
        attention: {attention}
    head: !new:{head_class} {head_kwargs}
    phrase_branch: {phrase_branch}

audio_normalizer: !new:speechbrain.dataio.preprocess.AudioNormalizer
    sample_rate: !ref <sample_rate>

modules:
    embedding_model: !ref <embedding_model>
{cohort}
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>{cohort_loadable}
"""
#: The training speakers of a fusion that weights the quality measure "cohort" (``cohort.ckpt``,
#: a NumPy array: ``speaker_model.TrainingSpeakers``), fetched and loaded like the model.
COHORT = """
# The fusion's quality measure "cohort": mean embedding of each training speaker (cohort.ckpt,
# a NumPy array), of which the top cohort_top_k cosines of a test and of a model are averaged.
cohort_top_k: {top_k}
cohort: !new:{module}.TrainingSpeakers
"""


def yaml_flow(value) -> str:
    """``value`` (JSON-like data) as a YAML flow collection: JSON, with YAML's ``.inf`` / ``.nan``.

    (``json.dumps`` writes ``Infinity``, which YAML reads as a string: a min_dcf threshold
    calibrated to reject everything is +inf.)
    """
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(str(k))}: {yaml_flow(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_flow(v) for v in value) + "]"
    return json.dumps(value)


def hyperparams_text(
    audio: AudioSettings, operating_point, settings, thresholds, head, text_dependent
) -> str:
    """The exported ``hyperparams.yaml`` (JSON values are YAML flow collections).

    ``settings``: the encoder's (``encoder_settings``); ``head``: ``(class name, kwargs)``;
    ``text_dependent``: ``{"phrase_branch": kwargs, "phrase_labels", "fusion"}`` or None; with
    ``"cohort_top_k"`` where the fusion needs the training speakers (``COHORT``).
    """
    head_class, head_kwargs = head
    module = Path(EXPORTED_MODULE).stem
    branch = "null"
    if text_dependent is not None:
        branch = f"!new:{module}.PhraseBranch {yaml_flow(text_dependent['phrase_branch'])}"
    text_dependent = text_dependent or {}
    top_k = text_dependent.get("cohort_top_k")
    return HYPERPARAMS.format(
        cohort="" if top_k is None else COHORT.format(top_k=top_k, module=module),
        cohort_loadable="" if top_k is None else "\n        cohort: !ref <cohort>",
        module=module,
        sample_rate=audio.sample_rate,
        max_eval_seconds=audio.max_eval_seconds,
        min_audio_seconds=audio.min_audio_seconds,
        operating_point=operating_point,
        thresholds=yaml_flow(thresholds),
        wavlm_config=yaml_flow(settings["wavlm_config"]),
        normalize_wav=settings["normalize_wav"],
        output_all_hiddens=settings["output_all_hiddens"],
        attention=settings["attention"],
        head_class=head_class,
        head_kwargs=yaml_flow(head_kwargs),
        phrase_branch=branch,
        phrase_labels=yaml_flow(text_dependent.get("phrase_labels")),
        fusion=yaml_flow(text_dependent.get("fusion")),
        costs=yaml_flow(SDSV_COSTS),
    )


def reference_utterances(dataset, count: int = 3) -> list[torch.Tensor]:
    """A few waveforms to check the export with (the dataset's first ``count``)."""
    return [dataset[i]["sig"] for i in range(min(count, len(dataset)))]


@torch.no_grad()
def min_cosine(reference, candidate, wavs) -> float:
    """The smallest cosine between two embedding functions' outputs over ``wavs``."""
    cosines = [F.cosine_similarity(reference(w), candidate(w), dim=-1).min() for w in wavs]
    return float(torch.stack(cosines).min())


def check_agreement(what: str, cosine: float) -> None:
    """Fail loudly if an exported model does not reproduce the trained one."""
    if cosine < MIN_COSINE:
        raise RuntimeError(f"export check failed: {what} embeddings have cosine {cosine:.6f}")


def export(target: ExportSettings, trained: ExportedRun, run_opts) -> Path:
    """Export the best checkpoint of the run ``trained`` to ``target``; the folder.

    A LoRA run's adapters are merged into WavLM first (``adaptation.merge_lora``). The folder
    is written once, with the calibration of the recipe's own scoring (``recipe_calibration``),
    then loaded as a user loads it and checked (``write_folder``); it replaces ``target`` only
    when every check passed.
    """
    settings = trained.settings
    prepare_data(settings.corpus)
    data = dataio_prep(settings.corpus, settings.audio)
    run = checkpoint_scoring(settings.scoring, settings.model, data, run_opts)
    merged = merge_lora(run.model.encoder.model)  # a plain WavLM: hf/ and ONNX as ever
    if merged:
        logger.info("LoRA adapters merged into WavLM's weights (%d linear layers)", merged)
    out = Path(target.folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    kept = f"nothing was published: {out} is as it was"
    try:
        with named_write_failures(f"the export of {out.name}", out.parent, kept):
            facts = write_folder(staging, target, trained, data, run)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing partial is left behind
        raise
    staging.chmod(0o755)  # mkdtemp makes it private; a model folder is for sharing
    published(staging, out)
    print(f"exported {facts['checkpoint']} to {out}: {json.dumps(facts['checks'])}")
    return out


#: What marks a folder as an export of this recipe (``write_folder`` writes both).
EXPORT_MARKERS = (EXPORT_FACTS, EXPORTED_MODULE)


def check_export_target(folder: Path, run_folder: Path) -> None:
    """Refuse an export folder that would replace anything but an earlier export.

    ``folder`` must be new, empty, or an earlier export (``EXPORT_MARKERS``), and neither the
    experiment folder ``run_folder`` nor a folder holding it: publishing replaces ``folder``.
    Checked before any work.
    """
    folder, run_folder = Path(folder).resolve(), Path(run_folder).resolve()
    if folder == run_folder or folder in run_folder.parents:
        raise SystemExit(
            f"error: export_folder {folder} would replace the experiment {run_folder} (its "
            f"checkpoints, manifests and reports): give a folder of its own, such as "
            f"{run_folder / 'export'}"
        )
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"error: export_folder {folder} is a file, not a folder")
    earlier_export = all((folder / name).is_file() for name in EXPORT_MARKERS)
    if folder.is_dir() and any(folder.iterdir()) and not earlier_export:
        raise SystemExit(
            f"error: export_folder {folder} holds files that are not an export of this "
            f"recipe (no {' / '.join(EXPORT_MARKERS)}): empty it, or give another folder"
        )


def remove_leftovers(out: Path) -> None:
    """Remove what an interrupted export of ``out`` left beside it.

    Its unfinished staging folders (``.NAME.*``, never loadable: no ``export.json``), and an
    earlier export moved aside by ``published`` (``.NAME.previous.*``) once ``out`` is complete;
    if ``out`` is not, that earlier export is the only complete one and stays.
    """
    complete = (out / EXPORT_FACTS).is_file()
    for path in sorted(out.parent.glob(f".{out.name}.*")):
        if path.name.startswith(f".{out.name}.previous.") and not complete:
            logger.warning("%s holds the last complete export of %s: kept", path, out)
            continue
        logger.warning("removing %s, left by an interrupted export", path)
        shutil.rmtree(path, ignore_errors=True)


def published(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` folder in place of ``out`` (an earlier export, or nothing).

    The earlier export is moved aside, not deleted, until the new one is in place: if this is
    interrupted, one of the two is complete at ``out`` or beside it.
    """
    if not out.exists():
        staging.rename(out)
        return
    previous = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.previous."))
    out.rename(previous / out.name)
    staging.rename(out)
    shutil.rmtree(previous)


def write_folder(staging: Path, target: ExportSettings, trained: ExportedRun, data, run):
    """Write and self-check the export of ``run``'s checkpoint in ``staging``; its facts."""
    scoring, audio = card_scoring(trained.settings.scoring), trained.settings.audio
    calibration = recipe_calibration(scoring, data, run)  # on the run's device, mostly cached
    class_encoder, checkpoint, model = data.class_encoder, run.checkpoint, run.model.cpu().eval()
    head = head_spec(trained.head)
    text_dependent = None
    if calibration.fusion is not None:  # a fusion needs the phrase branch (learned_fusion)
        text_dependent = {
            "phrase_branch": dict(model.phrase_branch.config),
            "phrase_labels": data.phrase_labels,
            "fusion": {**calibration.fusion, "kind": scoring.fusion},
        }
    state = model.state_dict()
    if text_dependent is None:  # a speaker-only export: the folder's model has no phrase branch
        state = {k: v for k, v in state.items() if not k.startswith("phrase_branch.")}
    torch.save(state, staging / "embedding_model.ckpt")
    for name, module in EXPORTED_CODE.items():
        (staging / name).write_text(exported_source(module), encoding="utf-8")
    if calibration.cohort is not None:  # the quality measure "cohort": the training speakers
        with open(staging / COHORT_FILE, "wb") as handle:  # .npy, under a loadable's name
            np.save(handle, calibration.cohort.astype(np.float32), allow_pickle=False)
        text_dependent["cohort_top_k"] = scoring.cohort_top_k
    (staging / "hyperparams.yaml").write_text(
        hyperparams_text(
            audio,
            target.operating_point,
            encoder_settings(model),
            calibration.thresholds,
            head,
            text_dependent,
        )
    )
    class_encoder.save(staging / "label_encoder.txt")
    valid = data.splits[VALID_SPLIT]
    wavs = reference_utterances(valid.utterances)
    speaker = speaker_embedding(model)
    verifier = load_verifier(staging, complete=False)  # as a user loads it: every check below
    checks = {"speechbrain_min_cosine": _check_speechbrain(verifier, speaker, wavs)}
    checks["hub_load_score_difference"] = _check_hub_load(
        staging, verifier, valid, text_dependent is not None
    )
    if text_dependent is not None:
        checks["phrase_max_logp_difference"] = _check_phrase_branch(verifier, model, wavs)
    if isinstance(model.head, XVectorHead):
        hf = write_hf_folder(staging / "hf", trained.classifier, run, class_encoder)
        checks.update(_check_hf(staging / "hf", hf, speaker, wavs, model.encoder.normalize_wav))
    else:
        logger.warning("hf/ not written: %s", NO_HF_FOLDER.format(head=trained.head_type))
    inputs = CheckInputs(
        data, run, wavs, scoring, audio, calibration,
        check_sample(valid, target.check_trials, trained.settings.corpus.seed),
        target.operating_point,
    )  # fmt: skip
    folder_scores = backend_scores(verifier, inputs.sample_splits(), inputs)[VALID_SPLIT]
    checks.update(
        trial_agreement("folder", inputs.recipe_sample_scores(), folder_scores, inputs.threshold())
    )
    onnx = None
    if target.onnx:
        onnx = export_onnx(staging, verifier, inputs, folder_scores, target)
        checks.update(onnx.checks)
    facts = {
        "checkpoint": checkpoint.path.name,
        "checkpoint_meta": checkpoint.meta,
        "wavlm_source": trained.wavlm_source,
        "head": head[0],
        "hf_folder": isinstance(model.head, XVectorHead),
        "target_type": trained.target_type,
        "training_classes": len(class_encoder),
        "eval_precision": run.precision,
        "thresholds": calibration.thresholds,
        "operating_point": target.operating_point,
        "fusion": None if text_dependent is None else text_dependent["fusion"],
        "phrase_labels": data.phrase_labels if text_dependent else None,
        "metrics": calibration.metrics,
        "checks": checks,
        "onnx": None if onnx is None else onnx.facts,
        "onnx_int8_metrics": None if onnx is None else onnx.int8_metrics,
    }
    (staging / "README.md").write_text(model_card(facts, Path(target.folder)))
    (staging / EXPORT_FACTS).write_text(json.dumps(facts, indent=2))  # last: it marks completion
    return facts


def _check_speechbrain(verifier, trained, wavs) -> float:
    """The loaded folder's embeddings must be the trained model's."""
    cosine = min_cosine(trained, lambda w: verifier.encode_batch(w).squeeze(1).cpu(), wavs)
    check_agreement("SpeechBrain folder", cosine)
    return cosine


#: The largest difference of a trial's score between the folder loaded as from the hub and in
#: place: the same code and weights, so only float rounding.
MAX_HUB_DIFFERENCE = 1e-5


def _check_hub_load(folder: Path, verifier, valid, phrase_scored: bool) -> float:
    """Load the folder as a hub user does and score the first validation trial with it.

    ``pretrained.score_as_a_hub_user``: SpeechBrain's ``foreign_class`` with a ``savedir``, from
    a stand-in hub repository of the folder, in an interpreter that cannot import this
    repository. Its score must be the one ``verifier`` (the folder loaded in place, in this
    process) gives (within ``MAX_HUB_DIFFERENCE``); the difference is returned.
    """
    trial = valid.trials.iloc[0]
    model = valid.models.set_index("model_id").loc[trial["model_id"]]
    wav = {uid: row["wav"] for uid, row in valid.utterances.data.items()}
    enrol, test = [wav[uid] for uid in model["enrol_ids"].split()], wav[trial["test_id"]]
    phrase = model["phrase_id"] if phrase_scored else None
    in_place = verifier.verify_trial(enrol, test, phrase=phrase).score
    with tempfile.TemporaryDirectory() as workdir:
        loaded = score_as_a_hub_user(folder, enrol, test, phrase, workdir)["score"]
    if abs(loaded - in_place) > MAX_HUB_DIFFERENCE:
        raise RuntimeError(
            f"export check failed: loaded as from the hub, the folder scores a validation trial "
            f"{loaded:.6f}, in place {in_place:.6f}"
        )
    return abs(loaded - in_place)


def speaker_embedding(model: WavLMSpeakerEmbedder):
    """``wav [T] -> [1, D]``: the trained model's speaker embedding of one waveform."""

    @torch.no_grad()
    def embed(wav: torch.Tensor) -> torch.Tensor:
        """The embedding of ``wav``, unbatched."""
        return model(wav[None]).squeeze(1)

    return embed


#: The largest difference of phrase log-posteriors between export and training that passes.
MAX_LOGP_DIFFERENCE = 1e-3


@torch.no_grad()
def _check_phrase_branch(verifier, model: WavLMSpeakerEmbedder, wavs) -> float:
    """The loaded folder's phrase log-posteriors must be the trained model's."""
    worst = max(
        float(
            (model.embed_all(w[None])["phrase_logp"][0] - verifier.embed_waveform(w)["phrase_logp"])
            .abs()
            .max()
        )
        for w in wavs
    )
    if worst > MAX_LOGP_DIFFERENCE:
        raise RuntimeError(f"export check failed: phrase log-posteriors differ by {worst:.2e}")
    return worst


def write_hf_folder(folder: Path, classifier, run, class_encoder) -> WavLMForXVector:
    """Write the checkpoint's ``WavLMForXVector`` copy (x-vector head) to ``folder``; the model.

    ``classifier`` builds the training classifier (``out_neurons``), whose weights HF keeps.
    """
    labels = [class_encoder.ind2lab[i] for i in range(len(class_encoder))]
    classifier = classifier(out_neurons=len(class_encoder))
    classifier.load_state_dict(checkpoint_state(run.checkpoint, "classifier"))
    hf = hf_xvector_model(run.model, classifier, labels)
    hf.save_pretrained(folder)
    run.model.encoder.feature_extractor.save_pretrained(folder)
    return hf


def _check_hf(folder: Path, hf, trained, wavs, normalize: bool) -> dict:
    """The HF model on the recipe's input (must agree) and on its own extractor's (reported)."""

    def same_input(wav):
        """HF's embedding of ``wav`` normalized as the recipe normalizes it."""
        return hf(input_values=recipe_input(wav, normalize)).embeddings

    cosine = min_cosine(trained, same_input, wavs)
    check_agreement("WavLMForXVector", cosine)
    own = load_verifier(folder)  # the HF feature extractor's normalization (eps 1e-7, not 1e-5)
    own_cosine = min_cosine(trained, lambda w: own.encode_batch(w).squeeze(1).cpu(), wavs)
    return {"hf_min_cosine": cosine, "hf_feature_extractor_min_cosine": own_cosine}


# ------------------------------------------------------------------------------------------------
# ONNX (recipes/onnx_export.py)
# ------------------------------------------------------------------------------------------------
class CheckInputs(NamedTuple):
    """What the folder's and the ONNX models' checks read: the run, its scores, the sample."""

    data: object  # dataio_prep's
    run: object  # checkpoint_scoring's
    wavs: list  # a few validation waveforms (embedding checks)
    scoring: ScoringSettings  # card_scoring's
    audio: AudioSettings
    calibration: ExportCalibration
    sample: CheckSample  # the validation trials the backends are checked on
    operating_point: str  # the folder's default one

    def sample_splits(self) -> dict:
        """``{"valid": the sample}``: what ``backend_scores`` scores for the checks."""
        return {VALID_SPLIT: self.sample.split}

    def recipe_sample_scores(self) -> np.ndarray:
        """The recipe's final scores of the sample's trials."""
        return self.calibration.scores[VALID_SPLIT][self.sample.positions]

    def threshold(self) -> float:
        """Where the checks compare decisions (``onnx_export.decision_threshold``)."""
        fused = self.calibration.fusion is not None
        return decision_threshold(self.calibration.thresholds, self.operating_point, fused)


class OnnxExport(NamedTuple):
    """The ONNX part of an export: ``export.json``'s facts, its checks and int8 metrics."""

    facts: dict
    checks: dict
    int8_metrics: dict | None  # every labelled split's, with export_int8_metrics


def export_onnx(folder: Path, verifier, inputs: CheckInputs, reference, target: ExportSettings):
    """Write the folder model's ONNX copies and check them (``check_onnx``); an ``OnnxExport``.

    ``verifier`` is the folder loaded as a user loads it, ``reference`` its final scores of the
    check sample. The fp32 graph must reproduce its embeddings and the sample's scores and
    decisions; the int8 copy's agreement on the sample is measured, and with
    ``export_int8_metrics`` its metrics on every labelled split too.
    """
    model, calibration = verifier.mods.embedding_model.eval(), inputs.calibration
    names = write_onnx_models(folder, model, inputs.audio)
    fp32 = OnnxVerifier(folder, complete=False)  # the folder's own decisions and cohort
    checks = graph_agreement(fp32, model, inputs.wavs)
    onnx_scores = backend_scores(fp32, inputs.sample_splits(), inputs)[VALID_SPLIT]
    checks.update(trial_agreement("onnx", reference, onnx_scores, inputs.threshold()))
    check_onnx(checks)
    int8 = OnnxVerifier(folder, ONNX_INT8_MODEL, complete=False)
    int8_scores = backend_scores(int8, inputs.sample_splits(), inputs)[VALID_SPLIT]
    checks.update(trial_agreement("int8", reference, int8_scores, inputs.threshold()))
    metrics = None
    if target.int8_metrics:
        splits = labelled_splits(inputs.data.splits)
        fused = calibration.fusion is not None
        metrics = split_metrics(backend_scores(int8, splits, inputs), splits, fused)
    return OnnxExport(onnx_facts(names), checks, metrics)


def backend_scores(verifier, splits: dict, inputs: CheckInputs) -> dict:
    """``{split: final scores}`` of ``splits`` embedded by ``verifier``, the folder's fusion."""
    scoring = inputs.scoring
    tables = {
        name: embed_dataset(verifier, split.utterances, scoring.loader_options, progress=False)
        for name, split in splits.items()
    }
    cohort, fusion = inputs.calibration.cohort, inputs.calibration.fusion
    per_split, _ = scored_tables(tables, cohort, scoring, splits, inputs.run.fusion, fusion)
    return {name: scored.final for name, scored in per_split.items()}


def check_onnx(checks: dict) -> None:
    """Refuse to publish an ONNX model that does not decide like the PyTorch one."""
    problems = []
    if checks["onnx_min_cosine"] < MIN_COSINE:
        problems.append(f"speaker embeddings have cosine {checks['onnx_min_cosine']:.6f}")
    if checks["onnx_phrase_max_logp_difference"] > MAX_LOGP_DIFFERENCE:
        difference = checks["onnx_phrase_max_logp_difference"]
        problems.append(f"phrase log-posteriors differ by {difference:.2e}")
    if checks["onnx_max_score_difference"] > MAX_LLR_DIFFERENCE:
        difference = checks["onnx_max_score_difference"]
        problems.append(f"validation trial scores differ by up to {difference:.2e}")
    if checks["onnx_decisions_differing"]:
        differing = checks["onnx_decisions_differing"]
        problems.append(f"{differing} validation decisions differ")
    if problems:
        raise RuntimeError("export check failed: model.onnx: " + "; ".join(problems))


def run_replacements(step: dict) -> dict:
    """The run's settings that ``hparams/export.yaml`` replaces (None: the run's own)."""
    return {"output_folder": step["output_folder"], "data_folder": step["data_folder"]}


def main(argv) -> None:
    """Read ``hparams/export.yaml`` and the run it names; export."""
    run_opts, step = load_step(argv)
    target = ExportSettings(
        Path(step["export_folder"]),
        step["export_operating_point"],
        step["export_onnx"],
        step["export_check_trials"],
        step["export_int8_metrics"],
    )
    check_export_target(target.folder, step["output_folder"])  # before any work
    hparams = load_run(step["run_hparams"], run_replacements(step), run_opts)
    export(target, exported_run(hparams), run_opts)


if __name__ == "__main__":
    main(sys.argv[1:])
