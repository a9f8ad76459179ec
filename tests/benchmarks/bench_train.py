"""Training-step speed of ``SpeakerBrain``: steps/s, utterances/s, audio seconds/s, peak memory.

Runs real ``fit_batch`` calls (forward, margin loss, backward, both optimizers) of the recipe as
``hparams/synthetic_demo.yaml`` wires it, on synthetic batches, for:

- the demo's tiny WavLM, and a WavLM Base+ sized model (same ``WavLMConfig`` as
  ``microsoft/wavlm-base-plus``, random weights);
- each precision the device supports (CPU: fp32, bf16; CUDA: fp32, fp16, bf16);
- the CNN frozen as each model's YAML has it (Base+ as ``wavlm_td.yaml``: frozen), or as asked;
- gradient checkpointing off / on;
- utterance lengths drawn like DeepMine's (1.5-5 s) batched at random (padding) or sorted by length
  (bucketing): "audio s/s" counts real audio only, so padding shows up as lost throughput.

One table row per setting; all rows also go to a JSON file. Data loading is not included.

    python tests/benchmarks/bench_train.py                       # CPU: short runs
    python tests/benchmarks/bench_train.py --models base_plus --steps 20 --batch_size 16  # GPU
    python tests/benchmarks/bench_train.py --models base_plus --precisions fp32 \
        --grad_checkpointing off --bucketing on        # one row (the options select the grid)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from tests.benchmarks.common import (
    device_name,
    model_dirs,
    peak_memory_mb,
    synchronize,
    training_batches,
    training_brain,
)


def frozen_cnn(model: str, choice: str) -> bool:
    """Whether the CNN is frozen: as the model's YAML has it (``auto``), or as asked."""
    if choice == "auto":  # wavlm_td.yaml freezes the pretrained CNN; the demo trains its own
        return model == "base_plus"
    return choice == "yes"


def run_setting(model_dir, model, precision, checkpointing, bucketing, args, tmp) -> dict:
    """Time ``args.steps`` training steps after ``args.warmup`` untimed ones."""
    run_opts = {"device": args.device, "precision": precision}
    freeze_cnn = frozen_cnn(model, args.freeze_cnn)
    brain = training_brain(
        model_dir,
        model,
        tmp,
        run_opts,
        gradient_checkpointing=checkpointing,
        freeze_cnn=freeze_cnn,
        augment=False,
    )
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    audio, seconds = 0.0, 0.0
    for index, (batch, batch_audio) in enumerate(
        training_batches(args.batch_size, args.warmup + args.steps, bucketing)
    ):
        if index == args.warmup:
            synchronize(args.device)
            start = time.perf_counter()
        brain.step += 1
        brain.fit_batch(batch)
        if index >= args.warmup:
            audio += batch_audio
    synchronize(args.device)
    seconds = time.perf_counter() - start
    return {
        "model": model,
        "precision": precision,
        "frozen_cnn": freeze_cnn,
        "grad_checkpointing": checkpointing,
        "bucketing": bucketing,
        "batch_size": args.batch_size,
        "steps_per_s": args.steps / seconds,
        "utts_per_s": args.steps * args.batch_size / seconds,
        "audio_s_per_s": audio / seconds,
        "peak_mb": peak_memory_mb(args.device),
        "device": device_name(args.device),
    }


def main() -> None:
    """Run every setting, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "base_plus"])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", help="default: all the device supports")
    parser.add_argument(
        "--grad_checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"]
    )
    parser.add_argument("--bucketing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument(
        "--freeze_cnn",
        choices=["auto", "yes", "no"],
        default="auto",
        help="auto: frozen for base_plus (as wavlm_td.yaml), trained for tiny (as the demo)",
    )
    parser.add_argument("--json", default="bench_train.json")
    args = parser.parse_args()
    precisions = args.precisions or (
        ["fp32", "fp16", "bf16"] if args.device.startswith("cuda") else ["fp32", "bf16"]
    )
    rows = []
    print(
        "| model | precision | frozen CNN | grad ckpt | bucketing "
        "| steps/s | utts/s | audio s/s | peak MB |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = model_dirs(tmp, args.models)
        for model, precision, checkpointing, bucketing in itertools.product(
            args.models,
            precisions,
            [choice == "on" for choice in args.grad_checkpointing],
            [choice == "on" for choice in args.bucketing],
        ):
            row = run_setting(dirs[model], model, precision, checkpointing, bucketing, args, tmp)
            rows.append(row)
            print(
                f"| {model} | {precision} | {row['frozen_cnn']} | {checkpointing} | {bucketing} | "
                f"{row['steps_per_s']:.2f} | {row['utts_per_s']:.1f} | "
                f"{row['audio_s_per_s']:.1f} | {row['peak_mb']:.0f} |",
                flush=True,
            )
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
