"""Score a trained model on the validation trials and the official lists.

The code behind ``verify_speakers.py``, the training recipe's final evaluation and the export.
Each utterance is embedded once (enrollment and test utterances together, longest first, in eval
mode under the configured precision) and the embeddings are cached next to the checkpoint they
came from, so rescoring (another score normalization, say) needs no model. Trials are then scored
by ``recipes.evaluation.scoring`` and reported by ``recipes.evaluation.verification_report``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import Checkpoint
from tqdm import tqdm

from data_prep.corpus import VALID_SPLIT, file_digest
from recipes.disk import WriteFailed, named_write_failures
from recipes.distributed import gathered, main_writes, on_main, shard
from recipes.evaluation.fusion import (
    QualityInputs,
    TrialScores,
    apply_fusion,
    learn_fusion,
    stored_or_learned_fusion,
    trial_scores,
)
from recipes.evaluation.scoring import METHODS as SCORE_NORMS
from recipes.evaluation.scoring import (
    EmbeddingTable,
    group_means,
    metrics_by_condition,
    trial_metrics,
)
from recipes.evaluation.verification_report import write_report
from recipes.experiment import (
    PRECISION_CHOICES,
    PRECISIONS,
    Cohort,
    ModelWiring,
    best_checkpoint,
    checkpoint_model,
    run_device,
    usable_precision,
)
from recipes.model.speaker_model import WavLMSpeakerEmbedder, per_utterance
from recipes.model.trial_decisions import DECISION_KINDS, DEFAULT_QUALITY, QUALITY_MEASURES
from recipes.setting_rules import PATH, Choice, ListOf, Range, rule
from recipes.training.checkpointing import MODEL_RECOVERABLE

logger = logging.getLogger(__name__)


#: ``fusion``: the speaker score alone ("none"), or a decision kind of the phrase fusion.
FUSIONS = ("none", *DECISION_KINDS)


@dataclass(frozen=True)
class ScoringSettings:
    """How trials are scored and where the reports go (the YAML's scoring keys)."""

    output_folder: str = field(metadata=rule(PATH))
    score_norm: str = field(metadata=rule(Choice(SCORE_NORMS)))
    # as-norm: the top-scoring cohort speakers kept
    cohort_top_k: int = field(metadata=rule(Range(1, integer=True)))
    fusion: str = field(metadata=rule(Choice(FUSIONS)))
    # the target prior the fusion is calibrated at
    fusion_prior: float = field(metadata=rule(Range(0, 1, low_open=True, high_open=True)))
    # autocast while embedding
    eval_precision: str = field(metadata=rule(Choice(PRECISION_CHOICES)))
    loader_options: dict  # SpeechBrain's dataloader options (eval_dataloader_options)
    max_eval_seconds: float  # the cap on a scored utterance (changes its embedding)
    sample_rate: int
    # quality measures the fusion weights too
    fusion_quality: tuple[str, ...] = field(default=(), metadata=rule(ListOf(QUALITY_MEASURES)))

    def __post_init__(self):
        """The quality measures as a tuple, whatever sequence the YAML gave."""
        object.__setattr__(self, "fusion_quality", tuple(self.fusion_quality))

    @property
    def needs_cohort(self) -> bool:
        """Whether scoring needs the training speakers (score normalization, cohort quality)."""
        return self.score_norm != "none" or "cohort" in self.fusion_quality

    def embedding_record(self, precision: str | None = None) -> dict:
        """The settings besides the model that change an embedding (see ``embedding_cache``).

        ``precision`` is the one actually run, where the device lacks ``eval_precision``.
        """
        return {
            "max_eval_seconds": self.max_eval_seconds,
            "eval_precision": precision or self.eval_precision,
            "sample_rate": self.sample_rate,
        }


def check_trial_ids(split: str, utt_ids, models: pd.DataFrame, trials: pd.DataFrame) -> None:
    """Fail before any heavy work if a trial or model names an utterance the split lacks."""
    known = set(utt_ids)
    unknown_models = sorted(set(trials["model_id"]) - set(models["model_id"]))
    enrol_ids = {i for ids in models["enrol_ids"] for i in ids.split()}
    missing = sorted((enrol_ids | set(trials["test_id"])) - known)
    if unknown_models or missing:
        raise KeyError(
            f"{split}: {len(unknown_models)} unknown model id(s) {unknown_models[:5]} and "
            f"{len(missing)} utterance id(s) without audio {missing[:5]} in the trial lists"
        )


def cached_embeddings(embed, dataset, cache_prefix: Path) -> dict[str, EmbeddingTable]:
    """The utterance tables of ``dataset``, from the cache where its audio has not changed.

    Tables: ``"speaker"``, and the phrase branch's outputs when the model has one.
    ``embed(dataset)`` computes them (``embed_tables`` with a checkpoint's model, or a
    loaded model folder's ``pretrained.embed_dataset``). The speaker table is cached as
    ``<prefix>.npy``, the others as ``<prefix>.<name>.npy``, and ``<prefix>.sources.json``
    (written last) records each utterance's file (path, size, modification time): an utterance
    whose file changed, or another corpus with the same ids, is embedded again (the log says how
    many), never scored with the embeddings of other audio. The embedding settings are checked
    per folder by ``embedding_cache``.
    """
    prefix = Path(cache_prefix)
    sources = utterance_sources(dataset)
    tables, unchanged = _cached_tables(prefix, sources)
    if tables is not None:
        stale = [uid for uid in dataset.data_ids if uid not in unchanged]
        if not stale:
            return tables
        logger.info(
            "embeddings in %s: %d of %d utterance(s) changed on disk since they were cached: "
            "embedding them again", prefix, len(stale), len(sources),
        )  # fmt: skip
        fresh = embed(dataset.filtered_sorted(key_test={"id": set(stale).__contains__}))
        tables = {name: _merged(tables[name], table) for name, table in fresh.items()}
    else:
        tables = embed(dataset)
    main_writes(_save_tables, prefix, tables, sources)  # read by every process next time
    return tables


def _save_tables(prefix: Path, tables: dict, sources: dict) -> None:
    """Cache ``tables`` at ``prefix``, the record of their audio files last.

    The old record goes first, so tables half written are never read as a cache. A cache that
    cannot be written (a full disk) is a warning naming it, its files removed: the scores need
    it not.
    """
    prefix.parent.mkdir(parents=True, exist_ok=True)
    record = Path(f"{prefix}.sources.json")
    record.unlink(missing_ok=True)
    kept = "the cache is dropped (its embeddings are computed again next time)"
    try:
        with named_write_failures(f"the embedding cache {prefix.name}", prefix.parent, kept):
            for name, table in tables.items():
                table.save(prefix if name == "speaker" else f"{prefix}.{name}")
            record.with_suffix(".tmp").write_text(json.dumps(sources))
            record.with_suffix(".tmp").replace(record)
    except WriteFailed as error:
        for path in prefix.parent.glob(f"{prefix.name}.*"):
            path.unlink(missing_ok=True)
        logger.warning("%s", error)


def utterance_sources(dataset) -> dict[str, list]:
    """Each utterance's file identity: ``[resolved path, size, modification time (ns)]``."""
    sources = {}
    for uid in dataset.data_ids:
        path = Path(dataset.data[uid]["wav"])
        try:
            info = path.stat()
        except OSError as error:
            raise FileNotFoundError(f"utterance {uid}: cannot read {path}: {error}") from error
        sources[uid] = [str(path.resolve()), info.st_size, info.st_mtime_ns]
    return sources


def _cached_tables(prefix: Path, sources: dict) -> tuple[dict | None, set]:
    """The cached tables (None when there are none) and the ids whose file is the one cached.

    A damaged cache (a truncated ``.npy``, a broken record, ids that do not match the rows) is
    none: it is embedded again, with a warning naming it, never used.
    """
    try:
        return _read_cached_tables(prefix, sources)
    except (ValueError, OSError, EOFError, KeyError) as error:  # json, numpy, our own checks
        logger.warning("embedding cache %s is damaged (%s): embedding again", prefix, error)
        return None, set()


def _read_cached_tables(prefix: Path, sources: dict) -> tuple[dict | None, set]:
    """``_cached_tables`` without the check for damage."""
    record = Path(f"{prefix}.sources.json")
    if not (record.is_file() and Path(f"{prefix}.npy").is_file()):
        return None, set()
    cached_sources = json.loads(record.read_text())
    parts = prefix.parent.glob(f"{prefix.name}.*.ids.txt")  # the non-speaker tables
    names = [p.name[len(prefix.name) + 1 : -len(".ids.txt")] for p in parts]
    tables = {"speaker": EmbeddingTable.load(prefix)}
    tables.update({name: EmbeddingTable.load(f"{prefix}.{name}") for name in names})
    common = set.intersection(*(set(t.ids) for t in tables.values()))
    unchanged = {
        uid
        for uid, source in sources.items()
        if uid in common and cached_sources.get(uid) == source
    }
    return tables, unchanged


def _merged(old: EmbeddingTable, new: EmbeddingTable) -> EmbeddingTable:
    """``old`` with the rows of ``new`` replacing (or added to) its rows of the same ids."""
    keep = [i for i, uid in enumerate(old.ids) if uid not in set(new.ids)]
    ids = [old.ids[i] for i in keep] + list(new.ids)
    return EmbeddingTable(ids, np.concatenate([old.matrix[keep], new.matrix]))


def embedding_cache(folder: Path, settings: dict) -> Path:
    """``folder``, emptied of cached embeddings made with other embedding ``settings``.

    The settings that change an embedding besides the model (the folder is per checkpoint or
    model): the length cap, the precision and the sample rate
    (``ScoringSettings.embedding_record``).
    """
    folder = Path(folder)
    main_writes(_settings_recorded, folder, settings)  # then every process reads the same files
    return folder


def _settings_recorded(folder: Path, settings: dict) -> None:
    """Record ``settings`` in ``folder``, unlinking caches that other settings made."""
    record = folder / "settings.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        logger.info(
            "embeddings in %s were made with %s, not %s: embedding again",
            folder, record.read_text().strip(), settings,
        )  # fmt: skip
        for cached in folder.glob("*.sources.json"):
            cached.unlink()  # the tables without their record are never read
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings))


def speaker_cohort(table: EmbeddingTable, speakers: pd.Series) -> np.ndarray:
    """One mean L2-normalized embedding per training speaker."""
    codes, uniques = pd.factorize(speakers.to_numpy())
    vectors = table.matrix[table.rows(list(speakers.index), "cohort")]
    return group_means(vectors, codes, len(uniques))


class FusionSource(NamedTuple):
    """Where a model's fusion is stored, its phrase classes, and what identifies the model."""

    path: Path
    phrase_labels: list[str] | None
    stamp: dict


class CheckpointScoring(NamedTuple):
    """A run's best checkpoint, ready to score: its model, how to embed, where things go."""

    checkpoint: Checkpoint
    model: WavLMSpeakerEmbedder  # with the checkpoint's weights
    embed: Callable  # dataset -> utterance tables
    cache: Path  # where embeddings of this checkpoint are cached (see ``embedding_cache``)
    precision: str  # what ``embed`` runs (``eval_precision``, or fp32 where the device lacks it)
    fusion: FusionSource
    model_digest: str  # of the checkpoint's model file: its caches are only for these weights

    def tables_cache(self, scoring: ScoringSettings) -> Path:
        """The folder of this checkpoint's cached tables under ``scoring`` (``embedding_cache``).

        Its record is the embedding settings (with the precision actually run) and the model
        file's digest: a checkpoint folder whose weights were replaced (another run's copied in
        under the same name) is embedded again.
        """
        record = {**scoring.embedding_record(self.precision), "model": self.model_digest}
        return embedding_cache(self.cache, record)


@torch.no_grad()
def embed_tables(model, dataset, loader_kwargs: dict, device, precision="fp32", progress=True):
    """Tables of every utterance of ``dataset``: ``"speaker"`` and the phrase branch's outputs.

    Batches of sorted utterances; a batch without padding goes without lengths (the fused,
    unmasked path: the same features, faster), as in training. ``precision`` (fp16 / bf16)
    runs the model under autocast, like SpeechBrain's ``eval_precision``. Under ``torchrun``
    each process embeds its share (``distributed.shard``) and every process gets all tables.
    """
    part = shard(dataset)
    loader = sb.dataio.dataloader.make_dataloader(part, **loader_kwargs)
    model = model.to(device).eval()
    outputs = {}
    for batch in tqdm(loader, desc="embedding", disable=not progress):
        wavs, lens = batch.sig
        padded = bool((lens < 1).any())
        with torch.autocast(device.type, PRECISIONS.get(precision), enabled=precision != "fp32"):
            result = model.embed_all(wavs.to(device), lens.to(device) if padded else None)
        for name, vectors in per_utterance(result).items():
            outputs.setdefault(name, {}).update(zip(batch.id, vectors.cpu().numpy(), strict=True))
    tables = gathered(outputs, total=len(dataset))
    return {name: EmbeddingTable.from_dict(vectors) for name, vectors in tables.items()}


def checkpoint_scoring(
    scoring: ScoringSettings, wiring: ModelWiring, data, run_opts: dict
) -> CheckpointScoring:
    """The one path from a run to scores: best checkpoint, trial ids checked, its model, caches.

    ``data`` is ``experiment.dataio_prep``'s. The model is built from the wiring and the
    checkpoint (``experiment.checkpoint_model``): no Brain, the same model an export ships.
    """
    checkpoint = best_checkpoint(wiring.checkpointer)
    check_splits(data.splits)
    model = checkpoint_model(wiring, checkpoint, len(data.phrase_encoder))
    device = run_device(run_opts)
    precision = usable_precision(scoring.eval_precision, device)
    embed = partial(
        embed_tables,
        model,
        loader_kwargs=scoring.loader_options,
        device=device,
        precision=precision,
        progress=not run_opts.get("noprogressbar"),
    )
    cache = Path(scoring.output_folder) / "embeddings" / checkpoint.path.name
    fusion = recipe_fusion_source(scoring, checkpoint, data.phrase_labels)
    digest = file_digest(checkpoint.path / f"{MODEL_RECOVERABLE}.ckpt")
    return CheckpointScoring(checkpoint, model, embed, cache, precision, fusion, digest)


def run_verification(scoring: ScoringSettings, wiring: ModelWiring, data, run_opts: dict) -> dict:
    """Score the run's best checkpoint on every split; write the reports; return the metrics."""
    run = checkpoint_scoring(scoring, wiring, data, run_opts)
    return score_splits(
        run.embed,
        scoring,
        data.splits,
        data.cohort,
        run.tables_cache(scoring),
        scoring.output_folder,
        run.fusion,
    )


def recipe_fusion_source(scoring: ScoringSettings, checkpoint, phrase_labels) -> FusionSource:
    """Where the fusion of a recipe checkpoint is stored (``<output_folder>/fusion/``)."""
    return FusionSource(
        Path(scoring.output_folder) / "fusion" / f"{checkpoint.path.name}.json",
        phrase_labels,
        {"checkpoint": checkpoint.path.name},
    )


def check_splits(splits: dict) -> None:
    """Every trial and model of every split names known utterances (before any heavy work)."""
    for name, split in splits.items():
        check_trial_ids(name, split.utterances.data_ids, split.models, split.trials)


def split_embeddings(embed, splits: dict, cache: Path) -> dict:
    """The utterance tables of each split (cached under ``cache/<split>``)."""
    return {
        name: cached_embeddings(embed, split.utterances, cache / name)
        for name, split in splits.items()
    }


def score_splits(
    embed,
    scoring: ScoringSettings,
    splits: dict,
    cohort: Cohort | None,
    cache: Path,
    report_folder,
    fusion_source=None,
) -> dict:
    """Embed (``embed(dataset) -> tables``), score, fuse and report every split; the metrics.

    Under ``torchrun`` every process embeds its share; the main process alone scores, learns
    the fusion and writes the reports, and every process returns its metrics.
    """
    tables, cohort_means = embedded(embed, scoring, splits, cohort, cache)
    return on_main(
        _score_and_report, tables, cohort_means, scoring, splits, report_folder, fusion_source
    )


def _score_and_report(tables, cohort, scoring, splits: dict, report_folder, fusion_source):
    """Score, fuse and report every split from its tables; ``{split: metrics}``."""
    results = {}
    per_split, fusion = scored_tables(tables, cohort, scoring, splits, fusion_source)
    for split, scored in per_split.items():
        models, trials = splits[split].models, splits[split].trials
        metrics = trial_metrics(scored.final, trials, llr=fusion is not None)
        name = report_name(split, scoring, scored.features.has_phrase)
        write_report(
            report_folder, name, trials, scored.final, metrics, models, scored.features,
            splits[split].official,
        )  # fmt: skip
        results[split] = metrics
    return results


def embedded(embed, scoring: ScoringSettings, splits: dict, cohort: Cohort | None, cache: Path):
    """``({split: tables}, cohort means or None)``: every utterance the scoring needs, embedded.

    The cohort is embedded when score normalization or a quality measure needs it
    (``ScoringSettings.needs_cohort``). Collective under ``torchrun``: every process embeds its
    share and gets all tables.
    """
    means = None
    if scoring.needs_cohort:
        if cohort is None:
            raise ValueError(
                f"score_norm {scoring.score_norm!r} / fusion_quality "
                f"{list(scoring.fusion_quality)} need the training speakers as a cohort"
            )
        cohort_table = cached_embeddings(embed, cohort.utterances, cache / "cohort")["speaker"]
        means = speaker_cohort(cohort_table, cohort.speakers)
    return split_embeddings(embed, splits, cache), means


class ScoredSplit(NamedTuple):
    """One split's trials scored: their features and the final scores (fused, or speaker)."""

    features: TrialScores
    final: np.ndarray


def scored_tables(
    tables: dict, cohort, scoring: ScoringSettings, splits: dict, fusion_source=None, fusion=None
):
    """``({split: ScoredSplit}, fusion or None)`` from ``embedded``'s tables and cohort means.

    With ``fusion`` "llr" or "gate", the fusion is learned on the validation trials (or read
    back from ``fusion_source.path`` when it was learned there from the same model and trials)
    and the final scores are its LLRs; otherwise they are the speaker scores. A ``fusion`` given
    is applied as it is (another backend's embeddings scored with a model's own fusion).
    """
    labels = fusion_source.phrase_labels if fusion_source else None
    norm_options = {
        "cohort": cohort,
        "score_norm": scoring.score_norm,
        "top_k": scoring.cohort_top_k,
    }
    scores = {
        name: trial_scores(
            tables[name],
            split.models,
            split.trials,
            labels,
            quality_inputs(scoring, split, cohort),
            **norm_options,
        )
        for name, split in splits.items()
    }
    if fusion is None:
        fusion = learned_fusion(scoring, splits, scores, fusion_source)
    final = {
        name: ScoredSplit(
            parts,
            parts.speaker if fusion is None else apply_fusion(fusion, parts, scoring.fusion),
        )
        for name, parts in scores.items()
    }
    return final, fusion


def quality_inputs(scoring: ScoringSettings, split, cohort) -> QualityInputs:
    """The quality measures of a split's trials and what they are computed from.

    Durations are the manifests', capped at ``max_eval_seconds`` (what is scored).
    """
    seconds = None
    if "duration" in scoring.fusion_quality:
        data = split.utterances.data
        seconds = pd.Series({uid: float(row["duration"]) for uid, row in data.items()})
        seconds = seconds.clip(upper=scoring.max_eval_seconds)
    return QualityInputs(tuple(scoring.fusion_quality), seconds, cohort, scoring.cohort_top_k)


def learned_fusion(scoring: ScoringSettings, splits: dict, scores: dict, source):
    """The fusion the settings ask for, learned on (or read back for) validation; or None.

    ``source`` is the model's ``FusionSource`` (None: a model without a phrase branch).
    """
    if scoring.fusion == "none":
        return None
    if source is None or not scores[VALID_SPLIT].has_phrase:
        raise ValueError(
            f"fusion {scoring.fusion!r} needs a model with a phrase branch "
            "(phrase_branch: True); use --fusion none for speaker scores only"
        )
    stamp = {**source.stamp, "score_norm": scoring.score_norm}
    tags = "".join(f"_{name}" for name in scoring.fusion_quality)
    path = source.path.with_name(f"{source.path.stem}_{scoring.score_norm}{tags}.json")
    conditions = splits[VALID_SPLIT].trials["condition"]
    return stored_or_learned_fusion(
        path, scores[VALID_SPLIT], conditions, scoring.fusion_prior, stamp, scoring.fusion_quality
    )


def check_validation_split(trials: pd.DataFrame, scoring: ScoringSettings) -> None:
    """Refuse, before any training, a validation split the settings cannot learn or select on.

    Data prep makes sure it has targets and non-targets (``manifests.split_valid``); a fusion
    also learns on its wrong-phrase (TW) trials, which a corpus whose held-out speakers each
    say one phrase lacks: the run would otherwise end, after training, without scores.
    """
    conditions = set(trials["condition"])
    if scoring.fusion != "none" and "TW" not in conditions:
        raise SystemExit(
            f"error: fusion: {scoring.fusion!r} learns on the validation split's wrong-phrase "
            f"(TW) trials, and it has none (its conditions: {', '.join(sorted(conditions))}): "
            "hold out speakers who say several phrases (valid_speakers, seed), or set "
            "fusion: none"
        )


def covered_trials(models, trials, embedded: set) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The models and trials whose utterances are all ``embedded`` (``--debug`` embeds a few)."""
    models = models[models["enrol_ids"].str.split().map(embedded.issuperset)]
    covered = trials["model_id"].isin(models["model_id"]) & trials["test_id"].isin(embedded)
    return models, trials[covered]


def validation_pass_metrics(tables, models, trials, phrase_labels, fusion: str, prior: float):
    """Pooled ``{"EER", "minDCF"}`` of the validation trials from utterance tables: one pass.

    The score is the system's: the speaker score, or with a fusion its LLR (the fusion learned
    on these same trials: three numbers, so the selection is not noticeably optimistic).
    ``tests/benchmarks/bench_scale.py`` times it at the real corpus's counts.
    """
    if trials.empty:
        return {"EER": 100.0, "minDCF": 1.0}
    parts = trial_scores(tables, models, trials, phrase_labels)
    scores = parts.speaker
    if fusion != "none" and (trials["condition"] == "TW").any():
        scores = apply_fusion(learn_fusion(parts, trials["condition"], prior), parts, fusion)
    pooled = metrics_by_condition(scores, trials["condition"]).get("pooled")
    if pooled is None:
        return {"EER": 100.0, "minDCF": 1.0}
    return {"EER": round(pooled["eer"], 3), "minDCF": round(pooled["min_dcf"], 4)}


def report_name(split: str, scoring: ScoringSettings, phrase_scored: bool) -> str:
    """The split's report name, tagged so that runs with other settings do not overwrite it.

    Score normalization tags it (``eval_as-norm``); so does a fusion other than the fused LLR of
    a model with a phrase branch: ``eval_gate``, and ``eval_speaker`` for its speaker scores
    alone (``fusion: none``); and quality measures other than the default (``quality_tag``). A
    speaker-only model's reports keep the plain name.
    """
    tags = [] if scoring.score_norm == "none" else [scoring.score_norm]
    if phrase_scored and scoring.fusion != "llr":
        tags.append("speaker" if scoring.fusion == "none" else scoring.fusion)
    tag = quality_tag(scoring.fusion_quality)
    if phrase_scored and scoring.fusion != "none" and tag:
        tags.append(tag)
    return "_".join([split, *tags])


def quality_tag(quality) -> str | None:
    """The report tag of the quality measures ``quality``; None for the YAMLs' default.

    ``quality-none`` for none, ``quality-duration-cohort`` for both (``DEFAULT_QUALITY``, the
    default, keeps the plain names: ``answer.txt``).
    """
    if tuple(quality) == DEFAULT_QUALITY:
        return None
    return "-".join(["quality", *quality] if quality else ["quality", "none"])
