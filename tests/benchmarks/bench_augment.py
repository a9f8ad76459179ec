"""Time per training batch of the recipe's augmentation, above all the noise files it reads.

SpeechBrain's ``AddNoise`` reads one noise file per utterance at every step, through its own
data loader: with ``num_workers: 0`` in the main process, where the GPU waits for it. This
writes ``--files`` noise wavs with DeepMine-like durations (1.5-5 s, like the recipe's default
noise list: other training utterances), then times, in interleaved rounds, ``AddNoise`` alone
with 0, 1, 2 loader workers (and with white noise: no files) and the whole ``wav_augment`` of
``hparams/wavlm_td.yaml``.

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

from recipes.tiny_wavlm import build_tiny_wavlm
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


def augmentations(csv: Path | None, workers: int, folder: Path, wavlm_dir: str) -> dict:
    """``wavlm_td.yaml``'s ``add_noise`` (with ``workers`` loader workers) and ``wav_augment``."""
    overrides = {
        "data_folder": str(folder),
        "output_folder": str(folder / "out"),
        "wavlm_source": wavlm_dir,  # the YAML builds its model too: a tiny one, unused here
        "wavlm_hidden_size": 96,
        "noise_csv": csv and str(csv),
        "add_noise": {"num_workers": workers},
    }
    with open(ROOT / "hparams" / "wavlm_td.yaml", encoding="utf-8") as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    return {
        f"AddNoise, {workers} workers": hparams["add_noise"],
        f"wav_augment, noise loader {workers} workers": hparams["wav_augment"],
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
        settings = {
            "AddNoise, white noise (no files)": augmentations(None, 0, Path(tmp), wavlm_dir)[
                "AddNoise, 0 workers"
            ]
        }
        for workers in (0, 1, 2):
            settings.update(augmentations(csv, workers, Path(tmp), wavlm_dir))
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
