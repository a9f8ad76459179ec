"""Shared fixtures: tiny synthetic corpora (both layouts), a hand-made miniature, a tiny WavLM."""

from __future__ import annotations

import os
from pathlib import Path

# The suite is the CPU's, on a machine with GPUs too: no test, and no process a test starts,
# sees one (``tests/benchmarks/gpu_smoke.py`` is the GPU's check). Set before torch meets CUDA.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np
import pytest
import soundfile as sf

from data_prep.synth_deepmine import SMALL_CORPUS, synthesize_corpus
from data_prep.synth_kaldi import read_phrases, synthesize_kaldi_corpus
from recipes.tiny_wavlm import build_tiny_wavlm
from tests.helpers import run_script

TINY = SMALL_CORPUS  # the tests' corpus
#: A corpus that shares nothing with DeepMine: Kaldi data directories, 30 English phrases of
#: its own, 5 enrollment utterances per model, no Persian, free text (about 1,100 files).
KALDI_EN30 = dict(
    speakers=4,
    eval_speakers=2,
    reps=6,
    enrol_utts=5,
    seed=11,
    free_text=2,
    free_text_trials=1,
    free_text_train=2,
)
PHRASES_EN30 = Path(__file__).parent / "data" / "english_phrases_30.txt"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus (6 train + 3 eval speakers, 4 repetitions, free text), once."""
    return synthesize_corpus(tmp_path_factory.mktemp("synth") / "corpus", jobs=2, **TINY)


@pytest.fixture(scope="session")
def kaldi_corpus(tmp_path_factory) -> Path:
    """The ``KALDI_EN30`` corpus in Kaldi's layout (``data_prep/synth_kaldi.py``), once."""
    out = tmp_path_factory.mktemp("kaldi") / "corpus"
    return synthesize_kaldi_corpus(out, read_phrases(PHRASES_EN30), jobs=2, **KALDI_EN30)


@pytest.fixture(scope="session")
def tiny_wavlm_dir(tmp_path_factory) -> str:
    """The demo's tiny random WavLM as a local Hugging Face directory, made once per run."""
    return build_tiny_wavlm(tmp_path_factory.mktemp("wavlm") / "tiny")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_corpus):
    """A 3-epoch run of the recipe on the tiny corpus: (experiment folder, its output)."""
    out = tmp_path_factory.mktemp("recipe") / "exp"
    return out, run_script(
        "train_speaker_embeddings.py", out, tiny_corpus, "--number_of_epochs", "3"
    )


def write_wav(path: Path, seconds=0.5, rate=16000, channels=1, seed=0) -> None:
    """A short noise wav (content does not matter to the parser)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.random.default_rng(seed).uniform(-0.1, 0.1, (int(seconds * rate), channels))
    sf.write(path, samples.squeeze(), rate, subtype="PCM_16")


def make_miniature(root: Path, style: str = "sdsv") -> Path:
    """A hand-made corpus in a real release's layout: 4 speakers x 2 phrases x 4 reps.

    ``style`` "sdsv" is SdSV 2020-21's: ``model_enrollment.txt`` (five columns, 2 models) and
    ``trials.txt``, with a ``trials_key.txt``. "tdsv2024" is TdSV 2024's as its evaluation plan
    (v1.1, sections 2.5-2.7) lays it out and quotes it, with no key: ``README.txt``, a dev pair
    (one model, 2 trials) and an eval pair whose lines are the plan's own examples (2 models, 3
    trials), six-column enrollment lines with a gender column.
    """
    docs = root / "docs"
    docs.mkdir(parents=True)
    lines, n = ["train-file-id speaker-id phrase-id"], 0
    for spk in range(1, 5):
        for phrase in ("01", "06"):
            for _ in range(4):
                n += 1
                lines.append(f"trn_{n:06d} spk_{spk:06d} {phrase}")
                write_wav(root / "wav" / "train" / f"trn_{n:06d}.wav", seed=n)
    lines.append("trn_000099 spk_000001 FT")  # free text: excluded by default
    write_wav(root / "wav" / "train" / "trn_000099.wav")
    (docs / "train_labels.txt").write_text("\n".join(lines) + "\n")
    if style == "tdsv2024":
        return _tdsv2024_lists(root)
    for i in range(1, 7):
        write_wav(root / "wav" / "enrollment" / f"enr_{i:06d}.wav", seed=100 + i)
    for i in range(1, 4):
        write_wav(root / "wav" / "evaluation" / f"evl_{i:06d}.wav", seed=200 + i)
    (docs / "model_enrollment.txt").write_text(
        "model-id phrase-id enroll-file-id1 enroll-file-id2 enroll-file-id3\n"
        "model_00000 01 enr_000001 enr_000002 enr_000003\n"
        "model_00001 06 enr_000004 enr_000005 enr_000006\n"
    )
    trials = ["model_00000 evl_000001", "model_00000 evl_000002", "model_00001 evl_000003"]
    (docs / "trials.txt").write_text("model-id evaluation-file-id\n" + "\n".join(trials) + "\n")
    (docs / "trials_key.txt").write_text(
        "model-id evaluation-file-id target-type trial-type\n"
        "model_00000 evl_000001 target TC\n"
        "model_00000 evl_000002 nontarget IC\n"
        "model_00001 evl_000003 nontarget TW\n"
    )
    return root


#: The TdSV 2024 miniature's official lists (``make_miniature(root, "tdsv2024")``): the eval
#: lines are the evaluation plan's examples.
TDSV2024_LISTS = {
    "dev_model_enrollment.txt": [
        "model-id phrase-id gender enroll-file-id1 enroll-file-id2 enroll-file-id3",
        "dev_model_000001 01 f enr_000001 enr_000002 enr_000003",
    ],
    "dev_trials.txt": [
        "model-id evaluation-file-id",
        "dev_model_000001 evl_000001",
        "dev_model_000001 evl_000002",
    ],
    "eval_model_enrollment.txt": [
        "model-id phrase-id gender enroll-file-id1 enroll-file-id2 enroll-file-id3",
        "eval_model_000001 05 m enr_036529 enr_036530 enr_036531",
        "eval_model_000002 08 f enr_010048 enr_010049 enr_010050",
    ],
    "eval_trials.txt": [
        "model-id evaluation-file-id",
        "eval_model_000001 evl_000122",
        "eval_model_000002 evl_000123",
        "eval_model_000001 evl_000123",
    ],
}


def _tdsv2024_lists(root: Path) -> Path:
    """The official lists and their audio of the TdSV 2024 miniature (``TDSV2024_LISTS``)."""
    (root / "README.txt").write_text("TdSV 2024 task 1 (a miniature for tests)\n")
    for name, lines in TDSV2024_LISTS.items():
        (root / "docs" / name).write_text("\n".join(lines) + "\n")
        for line in lines[1:]:
            fields = line.split()
            subdir = "enrollment" if "enrollment" in name else "evaluation"
            for file_id in fields[3:] if subdir == "enrollment" else fields[1:]:
                seed = int(file_id.split("_")[1])
                write_wav(root / "wav" / subdir / f"{file_id}.wav", seed=seed)
    return root
