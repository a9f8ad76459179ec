"""Training in stages on the demo: a second stage onto other phrases, and large-margin fine-tuning.

Both start from finished demo runs, one per seed (``tests/benchmarks/demo_seeds.py`` makes them in
``--demo_root``/SEED); each stage runs with the same seed as the demo run it starts from.

``second``: the README demo's recipe on a Kaldi-layout corpus that shares nothing with the demo's
(``data_prep/synth_kaldi.py`` with ``tests/data/english_phrases_30.txt``: 30 English phrases, other
speakers; ``SECOND_STAGE_CORPUS``), ``SECOND_STAGE_EPOCHS`` epochs, three ways:

- ``scratch``: the demo's tiny WavLM from its random initialization;
- ``full``: ``--init_from`` the demo run, every weight trained;
- ``lora``: ``--init_from`` the demo run, ``--wavlm_tuning lora`` (rank 16 on the attention
  projections: WavLM's own weights stay the demo's).

``lmft``: large-margin fine-tuning (``LMFT``) from each demo run on the demo's own data (the same
seed, so the same validation split and classes: the classifier carries over).

One row per run, then mean ± std and min-max per way (``demo_seeds.py``'s columns), written as a
Markdown table (and ``--json``).

    python tests/benchmarks/demo_seeds.py --seeds 1986 7 42 --output_root results/demo_seeds
    python tests/benchmarks/staged_training.py second --seeds 1986 7 42
    python tests/benchmarks/staged_training.py lmft --seeds 1986 7 42
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from data_prep.synth_kaldi import read_phrases, synthesize_kaldi_corpus
from tests.benchmarks.demo_seeds import markdown, run_numbers, summary

ROOT = Path(__file__).resolve().parents[2]
#: The second stage's corpus: 12 speakers (4 of them validation), 6 evaluation speakers.
SECOND_STAGE_CORPUS = dict(
    speakers=12, eval_speakers=6, reps=4, enrol_utts=3, seed=1234, jobs=2, free_text=2,
    free_text_trials=1, free_text_train=2,
)  # fmt: skip
SECOND_STAGE_EPOCHS = 4
#: The second stage's settings beside the demo YAML's (the corpus, its split, its length).
SECOND_STAGE = {
    "corpus": "kaldi", "synthetic_corpus": "null", "valid_speakers": "4",
    "enrol_utts": str(SECOND_STAGE_CORPUS["enrol_utts"]),
    "number_of_epochs": str(SECOND_STAGE_EPOCHS),
}  # fmt: skip
#: Each way of the second stage: its settings beside ``SECOND_STAGE`` (INIT: the demo run).
WAYS = {
    "scratch": {},
    "full": {"init_from": "INIT"},
    "lora": {"init_from": "INIT", "wavlm_tuning": "lora", "wavlm_attention": "sdpa"},
}
#: Large-margin fine-tuning as README's "Training in stages" gives it: from the previous stage,
#: whole utterances (crops of 6 s: the demo's are shorter), a larger margin at once, two epochs
#: at the learning rates the demo's schedule ended with.
LMFT = {
    "init_from": "INIT", "crop_seconds": "6.0", "margin": "0.5", "margin_warmup_epochs": "0",
    "number_of_epochs": "2", "lr_wavlm": "0.00005", "lr_head": "0.0002", "warmup_steps": "0",
}  # fmt: skip


def train(folder: Path, seed: int, settings: dict, init: Path) -> float:
    """The demo YAML with ``settings`` (INIT: ``init``) into ``folder``; its wall time."""
    given = {"seed": str(seed), "output_folder": str(folder), **settings}
    command = [
        sys.executable, str(ROOT / "recipes" / "train_speaker_embeddings.py"),
        str(ROOT / "hparams" / "synthetic_demo.yaml"), "--noprogressbar",
        *(f"--{k}={str(init) if v == 'INIT' else v}" for k, v in given.items()),
    ]  # fmt: skip
    print(" ".join(command[1:]), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{folder} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def run_ways(ways: dict, seeds, out: Path, demo_root: Path, reuse: bool) -> dict:
    """Train (or with ``reuse`` read) each way for each seed; ``{way: (rows, times)}``."""
    tables = {}
    for way, settings in ways.items():
        rows, times = {}, {}
        for seed in seeds:
            folder, init = out / way / str(seed), demo_root / str(seed)
            if not (init / "verification_eval.json").is_file():
                raise SystemExit(f"{init}: no finished demo run (tests/benchmarks/demo_seeds.py)")
            if not (reuse and (folder / "verification_eval.json").is_file()):
                times[seed] = train(folder, seed, settings, init)
            rows[seed] = run_numbers(folder)
        tables[way] = rows, times
    return tables


def main() -> None:
    """Run one experiment; print a table per way (and the demo's, for LMFT)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["second", "lmft"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1986, 7, 42])
    parser.add_argument("--demo_root", type=Path, default=ROOT / "results" / "demo_seeds")
    parser.add_argument("--output_root", type=Path, default=ROOT / "results" / "staged")
    parser.add_argument("--corpus", type=Path, default=ROOT / "results" / "synth_kaldi_en30")
    parser.add_argument("--reuse", action="store_true", help="read finished runs")
    parser.add_argument("--json", type=Path, help="also write the tables here")
    args = parser.parse_args()
    if args.stage == "second":
        phrases = read_phrases(ROOT / "tests" / "data" / "english_phrases_30.txt")
        synthesize_kaldi_corpus(args.corpus, phrases, **SECOND_STAGE_CORPUS)
        stage = {"data_folder": str(args.corpus), **SECOND_STAGE}
        ways = {way: {**stage, **settings} for way, settings in WAYS.items()}
    else:
        ways = {"lmft": LMFT}
    tables = run_ways(ways, args.seeds, args.output_root / args.stage, args.demo_root, args.reuse)
    if args.stage == "lmft":  # the runs it started from
        demo = {seed: run_numbers(args.demo_root / str(seed)) for seed in args.seeds}
        tables = {"demo (stage 1)": (demo, {}), **tables}
    report = {}
    for way, (rows, times) in tables.items():
        stats = summary(rows)
        print(f"\n{way}\n{markdown(rows, times, stats)}")
        report[way] = {"runs": rows, "seconds": times, "summary": stats}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
