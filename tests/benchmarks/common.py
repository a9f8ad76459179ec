"""What the benchmark scripts share: the recipe's Brain on the demo YAML, model folders, lengths."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np
import torch
from hyperpyyaml import load_hyperpyyaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from recipes.tiny_wavlm import build_tiny_wavlm, save_wavlm, wavlm_base_plus_config  # noqa: E402
from recipes.train_speaker_embeddings import build_brain  # noqa: E402

HIDDEN = {"tiny": 96, "base_plus": 768}


def model_dirs(tmp) -> dict:
    """Local WavLM folders: the demo's tiny one and a Base+ sized one (random weights)."""
    return {
        "tiny": build_tiny_wavlm(Path(tmp) / "tiny"),
        "base_plus": save_wavlm(Path(tmp) / "base_plus", wavlm_base_plus_config()),
    }


def demo_brain(model_dir, model: str, tmp, run_opts: dict, **overrides):
    """``SpeakerBrain`` as ``hparams/synthetic_demo.yaml`` wires it, for a given WavLM."""
    overrides = {
        "output_folder": str(tmp),
        "wavlm_source": model_dir,
        "wavlm_hidden_size": HIDDEN[model],
        "noise_csv": None,
        **overrides,
    }
    with open(ROOT / "hparams" / "synthetic_demo.yaml", encoding="utf-8") as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    return build_brain(hparams, {"noprogressbar": True, **run_opts}, n_classes=50, n_phrases=10)


def deepmine_lengths(count: int, seed: int = 0) -> np.ndarray:
    """Utterance durations in seconds drawn like DeepMine's pass-phrases (1.5-5 s)."""
    return np.random.default_rng(seed).uniform(1.5, 5.0, count)


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated, or this process's peak RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
