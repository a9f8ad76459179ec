"""Time ``prepare_deepmine`` on a corpus of N files (default 10k) in the real layout.

The corpus is a small synthetic one whose wavs are copied under N training ids (header reading and
validation cost the same whatever the audio says). Prints seconds per 10k files.

    python tests/benchmarks/bench_prepare.py --files 10000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_prep.deepmine_prepare import prepare_deepmine
from data_prep.synth_deepmine import synthesize_corpus


def build_corpus(root: Path, files: int) -> Path:
    """A task1 folder with ``files`` training utterances of 100 speakers."""
    seed_corpus = synthesize_corpus(root / "seed", speakers=2, eval_speakers=1, reps=4, seed=1)
    sources = sorted((seed_corpus / "wav" / "train").glob("*.wav"))
    corpus = root / "corpus"
    (corpus / "wav" / "train").mkdir(parents=True)
    (corpus / "docs").mkdir()
    lines = ["train-file-id speaker-id phrase-id"]
    for i in range(files):
        file_id = f"trn_{i + 1:06d}"
        shutil.copyfile(sources[i % len(sources)], corpus / "wav" / "train" / f"{file_id}.wav")
        lines.append(f"{file_id} spk_{i % 100 + 1:06d} {i // 100 % 10 + 1:02d}")
    (corpus / "docs" / "train_labels.txt").write_text("\n".join(lines) + "\n")
    return corpus


def main() -> None:
    """Build the corpus, then time data prep with 1 and with 16 reader threads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_corpus(Path(tmp), args.files)
        for jobs in (1, 16):
            start = time.perf_counter()
            prepare_deepmine(corpus, Path(tmp) / f"prep{jobs}", valid_speakers=10, jobs=jobs)
            seconds = time.perf_counter() - start
            print(
                f"jobs={jobs:2d}: {seconds:.2f} s for {args.files} files = "
                f"{seconds * 10000 / args.files:.2f} s per 10k files"
            )


if __name__ == "__main__":
    main()
