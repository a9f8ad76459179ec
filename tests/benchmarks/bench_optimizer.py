"""AdamW step time for WavLM Base+ fine-tuning: torch's default vs loop vs foreach vs fused.

The parameters are those the recipe trains with ``hparams/wavlm_td.yaml`` (Base+ sized WavLM,
CNN frozen, plus the x-vector head), with random gradients; each implementation is timed in
interleaved rounds so that a noisy machine affects all alike.

    python tests/benchmarks/bench_optimizer.py            # CPU here, or the GPU when there is one
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import WavLMModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from recipes.model.speaker_model import XVectorHead
from recipes.tiny_wavlm import wavlm_base_plus_config
from tests.benchmarks.common import interleaved_ms

# "default" is what torch picks when the YAML says nothing: foreach on CUDA, the loop on CPU.
IMPLEMENTATIONS = {
    "default": {},
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def trainable_parameters(device: str) -> list[torch.Tensor]:
    """Base+ WavLM (CNN frozen) and the x-vector head, with random gradients."""
    wavlm = WavLMModel(wavlm_base_plus_config())
    wavlm.freeze_feature_encoder()
    modules = torch.nn.ModuleList([wavlm, XVectorHead(768)]).to(device)
    params = [p for p in modules.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def main() -> None:
    """Time each implementation; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default="bench_optimizer.json")
    args = parser.parse_args()
    params = trainable_parameters(args.device)
    optimizers = {
        name: torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-5, **kw)
        for name, kw in IMPLEMENTATIONS.items()
    }
    rows = interleaved_ms(
        {name: optimizer.step for name, optimizer in optimizers.items()},
        args.rounds,
        args.steps,
        args.device,
    )
    count = sum(p.numel() for p in params) / 1e6
    print(f"{len(params)} tensors, {count:.1f} M parameters, device {args.device}")
    print("| AdamW | ms/step (median) | rounds | speed vs default |\n|---|---:|---|---:|")
    for row in rows:
        rounds = ", ".join(f"{v:.1f}" for v in row["ms_rounds"])
        ratio = rows[0]["ms_median"] / row["ms_median"]  # rows[0]: torch's default
        print(f"| {row['setting']} | {row['ms_median']:.1f} | {rounds} | {ratio:.2f}x |")
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
