"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from hyperpyyaml import load_hyperpyyaml
from hyperpyyaml.core import resolve_references
from speechbrain.dataio.batch import PaddedBatch

ROOT = Path(__file__).resolve().parents[1]


#: The scripts that run a step on a trained run, and the YAML each is passed.
STEP_YAMLS = {"verify_speakers.py": "verification.yaml", "export_model.py": "export.yaml"}


def run_script(script, out, corpus, *extra):
    """Run a recipe script on the demo YAML, scaled down for the tiny corpus; its output.

    A step on a trained run (``STEP_YAMLS``) gets its own YAML and ``--output_folder out``, the
    run: its other settings are the run's record's.
    """
    command = run_script_command(script, out, corpus, *extra)
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def run_script_command(script, out, corpus, *extra) -> list[str]:
    """The command line of ``run_script``."""
    if script in STEP_YAMLS:
        return [
            sys.executable,
            str(ROOT / "recipes" / script),
            *(["trials"] if script == "verify_speakers.py" else []),
            str(ROOT / "hparams" / STEP_YAMLS[script]),
            "--output_folder", str(out),
            "--noprogressbar",
            "--device", "cpu",
            *extra,
        ]  # fmt: skip
    return [
        sys.executable,
        str(ROOT / "recipes" / script),
        str(ROOT / "hparams" / "synthetic_demo.yaml"),
        *(f"--{key}={value}" for key, value in demo_overrides(out, corpus).items()),
        "--noprogressbar",
        "--device", "cpu",  # also on a machine with a GPU: the suite is the CPU's
        *extra,
    ]  # fmt: skip


def demo_overrides(out, corpus) -> dict[str, str]:
    """The demo YAML's settings scaled down for the tiny corpus (YAML values, as text)."""
    return {
        "output_folder": str(out),
        "data_folder": str(corpus),
        "synthetic_corpus": "null",
        "valid_speakers": "2",
        "crop_seconds": "1.0",
        "batch_size": "8",
        "margin_warmup_epochs": "0",
        "warmup_steps": "5",
        "total_steps": "100",
        "noise_csv": "null",
        "emb_dim": "64",
        "cohort_utts_per_speaker": "2",
    }


def experiment_record(folder: Path, corpus) -> Path:
    """``folder/experiment.yaml``: the demo YAML with ``demo_overrides``, as a run records it.

    Resolved as SpeechBrain writes a run's ``hyperparams.yaml``; the experiment's output folder
    is ``folder/exp``. A step's ``--run_hparams`` takes it where no run was trained.
    """
    overrides = "\n".join(f"{k}: {v}" for k, v in demo_overrides(folder / "exp", corpus).items())
    with open(ROOT / "hparams" / "synthetic_demo.yaml", encoding="utf-8") as handle:
        text = resolve_references(handle, overrides).getvalue()
    path = Path(folder) / "experiment.yaml"
    path.write_text(text)
    return path


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


def two_at_a_time(function, items) -> list:
    """``function`` of each item, two running at a time (in threads).

    For independent command-line calls: each is mostly one core's imports, and CI has two cores.
    """
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(function, items))
