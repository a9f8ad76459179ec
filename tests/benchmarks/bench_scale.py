"""DeepMine-scale dry run: data prep, a validation pass, final scoring, AS-norm, export thresholds.

Builds a task-1 folder with the real corpus's counts, then times each stage a real run goes
through and measures its peak memory (each stage in its own process: ``ru_maxrss``, imports
included). At ``--scale 1`` (default): 1,000 training speakers x 10 phrases x 10 repetitions
(100k files), 400 evaluation speakers with a 3-utterance model per phrase (4,000 models, 12k
enrollment files) and 15 test utterances per phrase (60k), 10M trials (per model: every TC and TW
test of its speaker, the rest IC and IW in equal numbers), 50 validation speakers (the real
config's).

What is real and what is not:
- Audio: eight short noise wavs (1-4 s, as DeepMine's utterances) hard-linked under every file
  name, so data prep reads and checks every file as it would on real data (from the page cache).
- Embeddings: random unit vectors (speaker 192-d, phrase embedding 128-d) and random phrase
  log-posteriors, given to the real scoring code through its ``embed`` hook: the scoring, fusion,
  normalization, report and answer-file code is the recipe's own.

    python tests/benchmarks/bench_scale.py                 # the real counts
    python tests/benchmarks/bench_scale.py --scale 0.01 --json stages.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from tests.benchmarks.common import peak_rss_mb

PHRASE_IDS = [f"{i:02d}" for i in range(1, 11)]
PHRASE_LABELS = [*PHRASE_IDS, "other"]
STAGES = ("data_prep", "validation", "final_scoring", "as_norm", "export_thresholds")


def real_counts(scale: float) -> dict:
    """The corpus counts at ``scale`` (1: the real task-1 counts)."""
    return {
        "train_speakers": max(12, round(1000 * scale)),
        "reps": 10,
        "eval_speakers": max(4, round(400 * scale)),
        "test_reps": 15,
        "trials": max(2000, round(10_000_000 * scale)),
        "valid_speakers": max(2, round(50 * scale)),
    }


# ------------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------------
def source_wavs(folder: Path) -> list[Path]:
    """Eight noise wavs of 1 to 4 s (16 kHz mono PCM), the audio of every file name."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng, paths = np.random.default_rng(0), []
    for i, seconds in enumerate((1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 3.5, 4.0)):
        path = folder / f"source_{i}.wav"
        sf.write(path, rng.uniform(-0.1, 0.1, int(seconds * 16000)), 16000, subtype="PCM_16")
        paths.append(path)
    return paths


def link_all(names: list[str], folder: Path, sources: list[Path]) -> None:
    """Hard-link each ``<name>.wav`` in ``folder`` to one of ``sources`` (round robin)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        os.link(sources[i % len(sources)], folder / f"{name}.wav")


def write_lines(path: Path, header: str, columns: list[np.ndarray]) -> None:
    """A docs list: the header, then the columns joined by spaces (vectorized: 10M lines)."""
    lines = columns[0].astype(object)
    for column in columns[1:]:
        lines = lines + " " + column.astype(object)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(header + "\n")
        handle.write("\n".join(lines.tolist()))
        handle.write("\n")


def build_corpus(root: Path, counts: dict) -> Path:
    """The task-1 folder (``docs/`` with a trial key, ``wav/``) with ``counts``."""
    corpus, sources = root / "corpus", source_wavs(root / "sources")
    docs = corpus / "docs"
    docs.mkdir(parents=True)
    spk, phrases, reps = counts["train_speakers"], len(PHRASE_IDS), counts["reps"]
    n_train = spk * phrases * reps
    train_ids = np.char.mod("trn_%07d", np.arange(1, n_train + 1))
    speaker_of = np.char.mod("spk_%06d", np.arange(n_train) // (phrases * reps) + 1)
    phrase_of = np.array(PHRASE_IDS)[np.arange(n_train) // reps % phrases]
    write_lines(docs / "train_labels.txt", "train-file-id speaker-id phrase-id",
                [train_ids, speaker_of, phrase_of])  # fmt: skip
    link_all(train_ids.tolist(), corpus / "wav" / "train", sources)

    n_spk, test_reps = counts["eval_speakers"], counts["test_reps"]
    n_models = n_spk * phrases
    model_ids = np.char.mod("model_%06d", np.arange(n_models))
    enrol_ids = np.char.mod("enr_%07d", np.arange(1, 3 * n_models + 1)).reshape(n_models, 3)
    write_lines(docs / "model_enrollment.txt",
                "model-id phrase-id enroll-file-id1 enroll-file-id2 enroll-file-id3",
                [model_ids, np.tile(PHRASE_IDS, n_spk), *enrol_ids.T])  # fmt: skip
    link_all(enrol_ids.ravel().tolist(), corpus / "wav" / "enrollment", sources)
    test_ids = np.char.mod("evl_%07d", np.arange(1, n_models * test_reps + 1))
    link_all(test_ids.tolist(), corpus / "wav" / "evaluation", sources)
    models, tests, conditions = draw_trials(counts)
    write_lines(docs / "trials.txt", "model-id evaluation-file-id",
                [model_ids[models], test_ids[tests]])  # fmt: skip
    target = np.where(conditions == "TC", "target", "nontarget")
    write_lines(docs / "trials_key.txt", "model-id evaluation-file-id target-type trial-type",
                [model_ids[models], test_ids[tests], target, conditions])  # fmt: skip
    return corpus


def draw_trials(counts: dict):
    """Model index, test index and condition of each trial (tests numbered by speaker, phrase).

    Per model: every test of its speaker (TC: its phrase, TW: the others), the rest of its share
    of the trials split between IC and IW tests of other speakers, drawn without repeats.
    """
    rng = np.random.default_rng(1)
    n_spk, phrases, reps = counts["eval_speakers"], len(PHRASE_IDS), counts["test_reps"]
    per_model = counts["trials"] // (n_spk * phrases)
    own = phrases * reps  # TC + TW tests of a model
    rest = max(0, per_model - own)
    parts = []
    for model in range(n_spk * phrases):
        speaker, phrase = divmod(model, phrases)
        own_tests = speaker * own + np.arange(own)
        others = np.delete(np.arange(n_spk), speaker)
        ic_pool = (others[:, None] * own + phrase * reps + np.arange(reps)).ravel()
        iw_pool = np.setdiff1d(np.arange(n_spk * own), np.r_[own_tests, ic_pool])
        ic = rng.choice(ic_pool, min(rest // 2, ic_pool.size), replace=False)
        iw = rng.choice(iw_pool, min(rest - ic.size, iw_pool.size), replace=False)
        tests = np.r_[own_tests, ic, iw]
        same_phrase = (tests % own) // reps == phrase
        same_speaker = tests // own == speaker
        condition = np.where(same_speaker, np.where(same_phrase, "TC", "TW"),
                             np.where(same_phrase, "IC", "IW"))  # fmt: skip
        parts.append((np.full(tests.size, model), tests, condition))
    models, tests, conditions = (np.concatenate(p) for p in zip(*parts, strict=True))
    return models, tests, conditions


# ------------------------------------------------------------------------------------------------
# The stages (each run in its own process by main)
# ------------------------------------------------------------------------------------------------
def random_embed(dataset) -> dict:
    """Random model outputs for ``dataset``'s utterances, seeded by the utterance ids."""
    from recipes.evaluation.scoring import EmbeddingTable

    ids = list(dataset.data_ids)
    rng = np.random.default_rng(len(ids))
    tables = {}
    for name, dim in (("speaker", 192), ("phrase_embedding", 128)):
        vectors = rng.standard_normal((len(ids), dim), dtype=np.float32)
        tables[name] = EmbeddingTable(ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    logits = rng.standard_normal((len(ids), len(PHRASE_LABELS)), dtype=np.float32)
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    tables["phrase_logp"] = EmbeddingTable(ids, logits)
    return tables


def load_splits(corpus: Path, prep: Path) -> dict:
    """The validation and eval ``Split``s as the recipe reads them (datasets over the manifests)."""
    import pandas as pd

    from recipes.experiment import Split, _utterances

    splits = {}
    for split in ("valid", "eval"):
        utts = _utterances([prep / f"{split}_enrol_utts.csv", prep / f"{split}_test.csv"], corpus)
        read = {"dtype": str, "keep_default_na": False}
        splits[split] = Split(
            utts,
            pd.read_csv(prep / f"{split}_enrol.csv", **read),
            pd.read_csv(prep / f"{split}_trials.csv", **read),
        )
    return splits


def stage_data_prep(work: Path, counts: dict) -> dict:
    """``prepare_deepmine`` on the corpus (lists read and checked, every sample read)."""
    from data_prep.deepmine_prepare import prepare_deepmine

    prepare_deepmine(work / "corpus", work / "prep", valid_speakers=counts["valid_speakers"])
    with open(work / "prep" / "valid_trials.csv", "rb") as handle:
        return {"valid_trials": sum(1 for _ in handle) - 1}


def stage_validation(work: Path, counts: dict) -> dict:
    """One validation pass from embeddings: the scores the Brain computes each epoch."""
    from recipes.evaluation.verification import validation_pass_metrics

    valid = load_splits(work / "corpus", work / "prep")["valid"]
    tables = random_embed(valid.utterances)
    start = time.perf_counter()
    metrics = validation_pass_metrics(
        tables, valid.models, valid.trials, PHRASE_LABELS, "llr", 0.01
    )
    return {"seconds": time.perf_counter() - start, "valid_trials": len(valid.trials), **metrics}


def _score(work: Path, score_norm: str) -> dict:
    """``score_splits`` on validation and eval as the recipe's final scoring runs it.

    With the default quality measures (the cohort's: every training speaker, 5 utterances each).
    """
    import pandas as pd

    from recipes.evaluation.verification import FusionSource, ScoringSettings, score_splits
    from recipes.experiment import Cohort, _cohort_utterances, _utterances
    from recipes.model.trial_decisions import DEFAULT_QUALITY

    splits = load_splits(work / "corpus", work / "prep")
    manifest = _cohort_utterances(work / "prep" / "train.csv", 5)
    cohort = Cohort(_utterances([manifest], work / "corpus"),
                    pd.read_csv(manifest, index_col="ID")["spk_id"])  # fmt: skip
    scoring = ScoringSettings(
        output_folder=str(work), score_norm=score_norm, cohort_top_k=300, fusion="llr",
        fusion_prior=0.01, eval_precision="fp32", loader_options={}, max_eval_seconds=30.0,
        sample_rate=16000, fusion_quality=DEFAULT_QUALITY,
    )  # fmt: skip
    folder = work / f"scores_{score_norm}"
    source = FusionSource(folder / "fusion.json", PHRASE_LABELS, {"model": "random"})
    start = time.perf_counter()
    results = score_splits(random_embed, scoring, splits, cohort, folder / "cache", folder,
                           source)  # fmt: skip
    seconds = time.perf_counter() - start
    written = sorted(p.name for p in folder.iterdir() if p.is_file())
    return {"seconds": seconds, "eval_trials": len(splits["eval"].trials), "written": written,
            "eval_pooled_eer": results["eval"]["pooled"]["eer"]}  # fmt: skip


def stage_final_scoring(work: Path, counts: dict) -> dict:
    """Scores, fusion (the cohort quality measure), reports, answer file, DET plots (no norm)."""
    return _score(work, "none")


def stage_as_norm(work: Path, counts: dict) -> dict:
    """The same with AS-norm against a cohort of every training speaker (5 utterances each)."""
    return _score(work, "as-norm")


def stage_export_thresholds(work: Path, counts: dict) -> dict:
    """The export's threshold calibration per number of enrollment utterances (validation)."""
    from recipes.export_model import enrolment_thresholds

    valid = load_splits(work / "corpus", work / "prep")["valid"]
    table = random_embed(valid.utterances)["speaker"]
    start = time.perf_counter()
    enrolment_thresholds(table, valid.models, valid.trials)
    return {"seconds": time.perf_counter() - start}


def run_stage(name: str, work: Path, counts: dict) -> None:
    """Run one stage in this process; print its result as one JSON line."""
    start = time.perf_counter()
    result = globals()[f"stage_{name}"](work, counts)
    result.setdefault("seconds", time.perf_counter() - start)
    result["peak_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps({"stage": name, **result}))


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def main(argv=None) -> list[dict]:
    """Build the corpus, run every stage in its own process, print (and write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real counts")
    parser.add_argument("--json", help="write the stages here as JSON")
    parser.add_argument("--workdir", help="build here (default: a temporary folder)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    counts = real_counts(args.scale)
    if args.stage:
        run_stage(args.stage, Path(args.workdir), counts)
        return []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        start = time.perf_counter()
        build_corpus(Path(tmp), counts)
        print(f"corpus {counts} built in {time.perf_counter() - start:.0f} s", flush=True)
        results = [stage_in_process(stage, Path(tmp), args.scale) for stage in STAGES]
    for row in results:
        print(f"{row['stage']:18s} {row['seconds']:8.1f} s {row['peak_mb']:8.0f} MB peak")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def stage_in_process(stage: str, work: Path, scale: float) -> dict:
    """Run ``stage`` in a fresh Python process; its JSON result."""
    command = [sys.executable, __file__, "--stage", stage, "--workdir", str(work),
               "--scale", str(scale)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"stage {stage} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
