"""Cost of padding-free features: the first CNN layer's GroupNorm, masked vs padding-blind.

The output of WavLM's first CNN layer is the model's largest tensor ([B, channels, samples / 5]).
Its GroupNorm is taken over each utterance's valid frames (``MaskedGroupNorm``) when a batch is
padded; a batch without padding takes torch's fused ``GroupNorm``. Timed here, forward alone
(frozen CNN, evaluation) and forward + backward (trained CNN), for the recipe's implementation,
torch's GroupNorm, and the elementwise masked form it replaced (``masked_mean_var``).

    python tests/benchmarks/bench_cnn_norm.py               # 16 x 2 s, 64 (tiny) and 512 (Base+)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from recipes.model.speaker_model import MaskedGroupNorm, masked_mean_var
from tests.benchmarks.common import interleaved_ms


def elementwise_masked(norm: MaskedGroupNorm):
    """The previous implementation: masked mean and variance, then normalize and scale."""

    def forward(x):
        frames = torch.arange(x.shape[-1], device=x.device)
        mask = (frames[None, :] < norm.valid_frames[:, None]).to(x.dtype)[:, None, :]
        mean, var = masked_mean_var(x, mask, dim=-1)
        y = (x - mean) * torch.rsqrt(var + norm.eps)
        return y * norm.weight[None, :, None] + norm.bias[None, :, None]

    return forward


def normalize(norm, x: torch.Tensor, backward: bool) -> None:
    """One forward pass (no graph), or forward + backward from a scalar loss."""
    if not backward:
        with torch.no_grad():
            norm(x)
        return
    norm(x.detach().requires_grad_(True)).square().mean().backward()


def main() -> None:
    """Time each implementation per channel count; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench_cnn_norm.json")
    args = parser.parse_args()
    frames = int(args.seconds * 16000) // 5
    generator = torch.Generator().manual_seed(0)
    valid = torch.randint(frames // 2, frames + 1, (args.batch_size,), generator=generator)
    print("| channels | pass | implementation | ms (median) | rounds |\n|---:|---|---|---:|---|")
    rows = []
    for channels in args.channels:
        x = torch.randn(args.batch_size, channels, frames, generator=generator).to(args.device)
        masked = MaskedGroupNorm(channels, channels).to(args.device)
        masked.valid_frames = valid.to(args.device)
        blind = torch.nn.GroupNorm(channels, channels).to(args.device)
        versions = {
            "MaskedGroupNorm (padded batch)": masked,
            "elementwise masked (before)": elementwise_masked(masked),
            "torch GroupNorm (unpadded batch)": blind,
        }
        for backward in (False, True):
            settings = {
                name: functools.partial(normalize, norm, x, backward)
                for name, norm in versions.items()
            }
            for row in interleaved_ms(settings, args.rounds, args.calls, args.device):
                row.update(channels=channels, backward=backward)
                rounds = ", ".join(f"{v:.0f}" for v in row["ms_rounds"])
                step = "forward + backward" if backward else "forward"
                print(
                    f"| {channels} | {step} | {row['setting']} | {row['ms_median']:.1f} "
                    f"| {rounds} |"
                )
                rows.append(row)
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
