"""Time per training batch of the recipe's augmentation, above all the noise files it reads.

SpeechBrain's ``AddNoise`` reads one noise file per utterance at every step, through its own data
loader, inside the training step. The recipe reads one noise crop per utterance in the training
loader's workers instead (``recipes/training/augmentation.py``) and only mixes in the step. This
writes ``--files`` noise wavs with DeepMine-like durations (1.5-5 s, like the recipe's default noise
list: other training utterances), then times, in interleaved rounds: SpeechBrain's ``AddNoise``
reading the files in the step (0 workers, as the recipe used to); the recipe's ``PrefetchedNoise``
mixing a batch's crops (what is left in the step); the same with white noise; the whole
``wav_augment`` of ``hparams/wavlm_td.yaml``; and, for scale, reading one batch of crops (the work
that moved to the loader's workers).

    python tests/benchmarks/bench_augment.py                      # batch 32 x 3 s, as wavlm_td
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from hyperpyyaml import load_hyperpyyaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from speechbrain.augment.time_domain import AddNoise
from speechbrain.dataio.batch import PaddedBatch

from recipes.tiny_wavlm import build_tiny_wavlm
from recipes.training.augmentation import PrefetchedNoise, noise_reader
from recipes.training.randomness import TrainingRandomness
from tests.benchmarks.common import ROOT, deepmine_lengths, interleaved_ms


def noise_csv(folder: Path, files: int) -> Path:
    """``files`` noise wavs and their SpeechBrain extended CSV (as data prep writes it)."""
    rng = np.random.default_rng(0)
    lines = ["ID,duration,wav,wav_format,wav_opts"]
    for i, seconds in enumerate(deepmine_lengths(files)):
        path = folder / f"noise_{i:05d}.wav"
        sf.write(path, rng.normal(0, 0.05, int(seconds * 16000)), 16000, subtype="PCM_16")
        lines.append(f"n{i},{seconds:.3f},{path},wav,")
    csv = folder / "noise.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def augmentations(csv: Path, folder: Path, wavlm_dir: str, wavs: torch.Tensor) -> dict:
    """The settings timed: callables of (waveforms, lengths)."""
    overrides = {
        "data_folder": str(folder),
        "output_folder": str(folder / "out"),
        "wavlm_source": wavlm_dir,  # the YAML builds its model too: a tiny one, unused here
        "wavlm_hidden_size": 96,
        "noise_csv": str(csv),
    }
    with open(ROOT / "hparams" / "wavlm_td.yaml", encoding="utf-8") as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    crop = wavs.shape[1]
    reader = noise_reader(csv, folder, 16000, crop, check=False, randomness=TrainingRandomness(0))
    crops = PaddedBatch([{"noise": reader("u")} for _ in range(wavs.shape[0])]).noise
    white = PrefetchedNoise(snr_low=5, snr_high=20)
    prefetched = hparams["add_noise"]

    def with_crops(module):
        """``module``, the batch's crops given to the noise before each call (as the Brain)."""

        def run(waveforms, lengths):
            prefetched.use(*crops)
            return module(waveforms, lengths)

        return run

    in_step = AddNoise(csv_file=str(csv), snr_low=5, snr_high=20, num_workers=0)
    return {
        "SpeechBrain AddNoise, files read in the step": in_step,
        "PrefetchedNoise, white noise (no files)": white,
        "PrefetchedNoise, the batch's crops": with_crops(prefetched),
        "wav_augment (wavlm_td.yaml), the batch's crops": with_crops(hparams["wav_augment"]),
        "reading one batch of crops (loader workers)": lambda w, lens: [
            reader("u") for _ in range(w.shape[0])
        ],
    }


def main() -> None:
    """Time each augmentation on random batches; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--crop_seconds", type=float, default=3.0)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench_augment.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    wavs = torch.randn(args.batch_size, int(args.crop_seconds * 16000)) * 0.1
    lens = torch.ones(args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        csv = noise_csv(Path(tmp), args.files)
        wavlm_dir = build_tiny_wavlm(Path(tmp) / "tiny")
        settings = augmentations(csv, Path(tmp), wavlm_dir, wavs)
        rows = interleaved_ms(
            {name: functools.partial(augment, wavs, lens) for name, augment in settings.items()},
            args.rounds,
            args.calls,
        )
    print(f"batch {args.batch_size} x {args.crop_seconds} s, {args.files} noise files")
    print("| augmentation | ms/batch (median) | rounds |\n|---|---:|---|")
    for row in rows:
        rounds = ", ".join(f"{v:.1f}" for v in row["ms_rounds"])
        print(f"| {row['setting']} | {row['ms_median']:.1f} | {rounds} |")
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
