"""Score a trained model on the dev / eval trials.

The code behind ``verify_speakers.py`` and the training recipe's final evaluation.
Each utterance is embedded once (enrollment and test utterances together, longest first, in eval
mode under the configured precision) and the embeddings are cached next to the checkpoint they
came from, so rescoring (another score normalization, say) needs no model. Trials are then scored
by ``recipes.scoring`` and reported by ``recipes.verification_report``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import speechbrain as sb

from recipes.scoring import EmbeddingTable, group_means, score_trials, trial_metrics
from recipes.verification_report import write_report


def best_checkpoint(brain):
    """The checkpoint with the lowest dev EER; a clear error when the folder has none."""
    checkpoint = brain.checkpointer.find_checkpoint(min_key="EER")
    if checkpoint is None:
        raise FileNotFoundError(
            f"no checkpoint with a dev EER in {brain.checkpointer.checkpoints_dir}: "
            "train first (recipes/train_speaker_embeddings.py) or point --output_folder at a run"
        )
    return checkpoint


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


def cached_embeddings(embed, dataset, cache_prefix: Path) -> EmbeddingTable:
    """Embeddings of every utterance in ``dataset``, from the cache when it has them.

    ``embed(dataset)`` computes an ``EmbeddingTable`` (the recipe's Brain, or a loaded model).
    """
    if Path(f"{cache_prefix}.npy").is_file():
        table = EmbeddingTable.load(cache_prefix)
        if set(table.ids) >= set(dataset.data_ids):
            return table
    table = embed(dataset)
    if sb.utils.distributed.if_main_process():
        cache_prefix.parent.mkdir(parents=True, exist_ok=True)
        table.save(cache_prefix)
    return table


def speaker_cohort(table: EmbeddingTable, speakers: pd.Series) -> np.ndarray:
    """One mean L2-normalized embedding per training speaker."""
    codes, uniques = pd.factorize(speakers.to_numpy())
    vectors = table.matrix[table.rows(list(speakers.index), "cohort")]
    return group_means(vectors, codes, len(uniques))


def run_verification(brain, hparams, splits: dict, cohort_set=None) -> dict:
    """Score the recipe's best checkpoint on every split; write the reports; return the metrics.

    ``splits`` maps a split name to ``(utterances, models, trials)``; ``cohort_set`` is a
    ``(dataset, speaker per utterance id)`` pair, needed for s-norm / AS-norm.
    """
    checkpoint = best_checkpoint(brain)
    check_splits(splits)
    brain.checkpointer.recover_if_possible(min_key="EER")
    cache = Path(hparams["output_folder"]) / "embeddings" / checkpoint.path.name
    embed = partial(brain.embed, loader_kwargs=hparams["eval_dataloader_options"])
    return score_splits(embed, hparams, splits, cohort_set, cache, hparams["output_folder"])


def check_splits(splits: dict) -> None:
    """Every trial and model of every split names known utterances (before any heavy work)."""
    for split, (utts, models, trials) in splits.items():
        check_trial_ids(split, utts.data_ids, models, trials)


def split_embeddings(embed, splits: dict, cache: Path) -> dict:
    """The embedding table of each split's utterances (cached under ``cache/<split>``)."""
    return {
        split: cached_embeddings(embed, utts, cache / split) for split, (utts, *_) in splits.items()
    }


def score_splits(embed, hparams, splits: dict, cohort_set, cache: Path, report_folder) -> dict:
    """Embed (``embed(dataset) -> EmbeddingTable``), score and report every split."""
    cohort, norm = None, hparams["score_norm"]
    if norm != "none":
        if cohort_set is None:
            raise ValueError(f"score_norm {norm!r} needs the training speakers as a cohort")
        cohort_table = cached_embeddings(embed, cohort_set[0], cache / "cohort")
        cohort = speaker_cohort(cohort_table, cohort_set[1])
    tables = split_embeddings(embed, splits, cache)
    results = {}
    for split, (_, models, trials) in splits.items():
        scores = score_trials(tables[split], models, trials, cohort, norm, hparams["cohort_top_k"])
        metrics = trial_metrics(scores, trials)
        if sb.utils.distributed.if_main_process():
            name = split if norm == "none" else f"{split}_{norm}"  # runs do not overwrite
            write_report(report_folder, name, trials, scores, metrics, models)
        results[split] = metrics
    return results
