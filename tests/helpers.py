"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.batch import PaddedBatch

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, out, corpus, *extra):
    """Run a recipe script on the demo YAML, scaled down for the tiny corpus; its output."""
    command = run_script_command(script, out, corpus, *extra)
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def run_script_command(script, out, corpus, *extra) -> list[str]:
    """The command line of ``run_script``."""
    return [
        sys.executable,
        str(ROOT / "recipes" / script),
        *(["trials"] if script == "verify_speakers.py" else []),
        str(ROOT / "hparams" / "synthetic_demo.yaml"),
        "--output_folder", str(out),
        "--data_folder", str(corpus),
        "--synthetic_corpus", "null",
        "--dev_speakers", "2",
        "--crop_seconds", "1.0",
        "--batch_size", "8",
        "--margin_warmup_epochs", "0",
        "--warmup_steps", "5",
        "--total_steps", "100",
        "--noise_csv", "null",
        "--emb_dim", "64",
        "--cohort_utts_per_speaker", "2",
        "--noprogressbar",
        "--device", "cpu",  # also on a machine with a GPU: the suite is the CPU's
        *extra,
    ]  # fmt: skip


def load_yaml(name: str, overrides: dict):
    """An hparams file of the repository, loaded with ``overrides``."""
    with open(ROOT / "hparams" / name, encoding="utf-8") as handle:
        return load_hyperpyyaml(handle, overrides)


def fake_batch(n=4, seconds=1.0):
    """A padded batch of ``n`` noise utterances with class and phrase labels."""
    examples = [
        {
            "id": f"u{i}",
            "sig": torch.randn(int(16000 * seconds * (1 - 0.2 * (i % 2)))),
            "class_encoded": torch.tensor([i % 3]),
            "phrase_encoded": torch.tensor([i % 2]),
        }
        for i in range(n)
    ]
    return PaddedBatch(examples)


def free_port() -> int:
    """A free TCP port on the loopback interface (for a process group's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
