#!/usr/bin/env python3
"""Score a trained checkpoint on the dev and eval trials, as the SdSV / TdSV challenges define it.

    python recipes/verify_speakers.py hparams/synthetic_demo.yaml
    python recipes/verify_speakers.py hparams/wavlm_td.yaml --data_folder /data/task1 \
        --score_norm as-norm

Uses the experiment folder of the same hparams (``--output_folder``), loads the checkpoint with
the best dev EER, embeds every utterance once (cached under ``embeddings/<checkpoint>/``) and
writes, per split: ``scores_<split>.txt``, ``verification_<split>.json``, ``det_<split>.png``,
and ``answer.txt`` (one score per line in ``trials.txt`` order) for the eval trials.
"""

from __future__ import annotations

import sys
from pathlib import Path

import speechbrain as sb
from hyperpyyaml import load_hyperpyyaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.train_speaker_embeddings import build_brain, dataio_prep, prepare_data
from recipes.verification import best_checkpoint, run_verification


def main(argv) -> None:
    """Prepare the manifests if needed, load the best checkpoint, score and report."""
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    with open(hparams_file, encoding="utf-8") as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    prepare_data(hparams)
    _, splits, cohort_set, class_encoder, phrase_encoder = dataio_prep(hparams)
    brain = build_brain(hparams, run_opts, len(class_encoder), len(phrase_encoder))
    best_checkpoint(brain)  # a clear error now, not after loading data
    run_verification(brain, hparams, splits, cohort_set)


if __name__ == "__main__":
    main(sys.argv[1:])
