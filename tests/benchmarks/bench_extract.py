"""Embedding extraction and trial scoring speed, as the verification recipe runs them.

Extraction: ``recipes.evaluation.verification.embed_tables`` with the demo's embedding model (the
code behind final scoring, ``verify_speakers.py`` and the export; the phrase branch included) over
utterances with DeepMine-like durations (1.5-5 s), sorted longest first as the recipe sorts them,
one utterance at a time and in padded batches, for the demo's tiny WavLM and a WavLM Base+ sized
one (random weights), at each precision the device supports. Reports utterances/s, the real-time
factor (compute seconds per audio second), peak memory, and how far batched embeddings are from
one-at-a-time ones (``1 - min cosine``: padding must not change an embedding).

Scoring: 1M trials from cached embeddings (``recipes.evaluation.scoring.score_trials``, 3-utterance
models) plus EER / minDCF by condition, for a dense list (1000 models x 1000 tests, like the dev
trials) and a sparse one (1M random pairs of 20k models and 50k tests).

    python tests/benchmarks/bench_extract.py                                   # CPU
    python tests/benchmarks/bench_extract.py --models base_plus --utterances 512 \
        --batch_sizes 1 16 64                                                  # GPU
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from speechbrain.dataio.dataset import DynamicItemDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from recipes.evaluation.scoring import EmbeddingTable, metrics_by_condition, score_trials
from recipes.evaluation.verification import embed_tables
from tests.benchmarks import common


def utterances(count: int, seed: int = 0) -> tuple[DynamicItemDataset, float]:
    """Random waveforms with DeepMine-like durations, longest first; and their total seconds."""
    seconds = common.deepmine_lengths(count, seed)
    generator = torch.Generator().manual_seed(seed)
    data = {
        f"u{i:05d}": {"sig": torch.randn(int(s * 16000), generator=generator) * 0.1, "duration": s}
        for i, s in enumerate(seconds)
    }
    dataset = DynamicItemDataset(data, output_keys=["id", "sig"])
    return dataset.filtered_sorted(sort_key="duration", reverse=True), float(seconds.sum())


def time_extraction(embedder, dataset, batch_size: int, device: str, precision: str):
    """Seconds to embed ``dataset`` (after one untimed batch to warm up), and the embeddings."""
    options = {"batch_size": batch_size}
    embed = functools.partial(
        embed_tables, embedder, loader_kwargs=options, device=torch.device(device),
        precision=precision, progress=False,
    )  # fmt: skip
    embed(dataset.filtered_sorted(select_n=batch_size))
    common.synchronize(device)
    start = time.perf_counter()
    table = embed(dataset)["speaker"]
    common.synchronize(device)
    return time.perf_counter() - start, table


def min_cosine(a: EmbeddingTable, b: EmbeddingTable) -> float:
    """The smallest cosine between the two tables' embeddings of the same utterance."""
    x, y = a.matrix, b.matrix[b.rows(a.ids, "utterance")]
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    return float(cos.min())


def extraction_rows(args) -> list[dict]:
    """Every model x precision x batch size, timed."""
    precisions = args.precisions or (
        ["fp32", "fp16", "bf16"] if args.device.startswith("cuda") else ["fp32", "bf16"]
    )
    dataset, audio = utterances(args.utterances)
    rows = []
    print("| model | precision | batch | utts/s | RTF | peak MB | 1 - min cos vs batch 1 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = common.model_dirs(tmp, args.models)
        for model, precision in itertools.product(args.models, precisions):
            embedder = common.demo_embedder(dirs[model], model, tmp)
            single = None
            for batch_size in sorted(set(args.batch_sizes) | {1}):
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                seconds, table = time_extraction(
                    embedder, dataset, batch_size, args.device, precision
                )
                single = table if batch_size == 1 else single
                row = {
                    "model": model,
                    "precision": precision,
                    "batch_size": batch_size,
                    "utts_per_s": len(dataset) / seconds,
                    "rtf": seconds / audio,
                    "peak_mb": common.peak_memory_mb(args.device),
                    "deviation": 1.0 - min_cosine(single, table),
                    "device": common.device_name(args.device),
                }
                rows.append(row)
                print(
                    f"| {model} | {precision} | {batch_size} | {row['utts_per_s']:.1f} | "
                    f"{row['rtf']:.4f} | {row['peak_mb']:.0f} | {row['deviation']:.1e} |",
                    flush=True,
                )
    return rows


def trial_lists(kind: str, trials: int, dim: int, seed: int = 0):
    """Embeddings, 3-utterance models and labelled trials for a dense or sparse list."""
    rng = np.random.default_rng(seed)
    n_models, n_tests = (1000, trials // 1000) if kind == "dense" else (20000, 50000)
    enrol_ids = [f"e{i}" for i in range(3 * n_models)]
    test_ids = [f"t{i}" for i in range(n_tests)]
    table = EmbeddingTable(enrol_ids + test_ids, rng.normal(size=(len(enrol_ids) + n_tests, dim)))
    models = pd.DataFrame(
        {
            "model_id": [f"m{i}" for i in range(n_models)],
            "enrol_ids": [" ".join(enrol_ids[3 * i : 3 * i + 3]) for i in range(n_models)],
        }
    )
    if kind == "dense":
        m, t = np.divmod(np.arange(n_models * n_tests), n_tests)
    else:
        m, t = rng.integers(0, n_models, trials), rng.integers(0, n_tests, trials)
    conditions = rng.choice(["TC", "TW", "IC", "IW"], size=len(m), p=[0.05, 0.1, 0.15, 0.7])
    trial_table = pd.DataFrame(
        {"model_id": models["model_id"].to_numpy()[m], "test_id": np.array(test_ids)[t]}
    )
    return table, models, trial_table.assign(condition=conditions)


def scoring_rows(args) -> list[dict]:
    """Time scoring and metrics of ``args.trials`` trials from cached embeddings."""
    rows = []
    print("\n| trial list | trials | scoring s | EER + minDCF by condition s |")
    print("|---|---:|---:|---:|")
    for kind in ("dense", "sparse"):
        table, models, trials = trial_lists(kind, args.trials, args.dim)
        start = time.perf_counter()
        scores = score_trials(table, models, trials)
        scored = time.perf_counter()
        metrics_by_condition(scores, trials["condition"])
        done = time.perf_counter()
        row = {"list": kind, "trials": len(trials), "score_s": scored - start}
        row["metrics_s"] = done - scored
        rows.append(row)
        print(f"| {kind} | {len(trials):,} | {row['score_s']:.2f} | {row['metrics_s']:.2f} |")
    return rows


def main() -> None:
    """Run the extraction and scoring benchmarks, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "base_plus"])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", help="default: all the device supports")
    parser.add_argument("--utterances", type=int, default=48)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--trials", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--json", default="bench_extract.json")
    args = parser.parse_args()
    results = {"extraction": extraction_rows(args), "scoring": scoring_rows(args)}
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
