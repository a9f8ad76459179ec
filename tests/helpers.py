"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script, out, corpus, *extra):
    """Run a recipe script on the demo YAML, scaled down for the tiny corpus; its output."""
    command = [
        sys.executable,
        str(ROOT / "recipes" / script),
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
        *extra,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr
