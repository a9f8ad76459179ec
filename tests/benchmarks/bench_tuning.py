"""What tuning all of WavLM, its LoRA adapters or none of it costs (``wavlm_tuning``).

For a WavLM Base+ sized model (random weights, the CNN frozen as ``wavlm_td.yaml`` has it) and the
demo's heads, ``SpeakerBrain.fit_batch`` steps (forward, margin loss, backward, the optimizers)
for ``full``, ``lora`` (``lora_rank`` 16 on the attention projections, as ``wavlm_td.yaml``) and
``frozen``: trainable parameters (all, and WavLM's own), steps/s and peak memory, in the given
precision. Each setting runs in its own process, so that each peak memory is its own (on a CPU,
the process's peak resident memory); the settings are interleaved over ``--rounds``.

    python tests/benchmarks/bench_tuning.py                         # CPU, bf16, 2 rounds
    python tests/benchmarks/bench_tuning.py --device cuda:0 --batch_size 32 --steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from recipes.model.adaptation import TUNING_MODES
from tests.benchmarks.bench_train import timed_steps, trainable_parameters
from tests.benchmarks.common import model_dirs, training_brain, write_rows


def one_setting(model_dir: str, tuning: str, args) -> dict:
    """Time ``args.steps`` training steps with ``wavlm_tuning: tuning`` (in this process)."""
    run_opts = {"device": args.device, "precision": args.precision}
    with tempfile.TemporaryDirectory() as tmp:
        brain = training_brain(
            model_dir, "base_plus", tmp, run_opts, wavlm_tuning=tuning, wavlm_attention="sdpa",
            freeze_cnn=True, augment=False, gradient_checkpointing=False,
        )  # fmt: skip

        def step(batch):
            brain.step += 1
            brain.fit_batch(batch)

        row = {
            "tuning": tuning,
            "precision": args.precision,
            "trainable_params": trainable_parameters(brain.modules),
            "wavlm_trainable_params": trainable_parameters(brain.model().encoder),
        }
        return timed_steps(step, args, True, row)


def main() -> None:
    """Run each setting in a child process, interleaved over rounds; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunings", nargs="+", choices=TUNING_MODES, default=list(TUNING_MODES))
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default="bench_tuning.json")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "TUNING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one setting: its row as JSON on the last line
        print(json.dumps(one_setting(*args.child, args)))
        return
    rows = []
    print("| round | wavlm_tuning | trainable | of them WavLM's | steps/s | x full | peak MB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dirs(tmp, ["base_plus"])["base_plus"]
        common = [
            f"--{key}={getattr(args, key)}"
            for key in ("device", "precision", "batch_size", "steps", "warmup")
        ]
        for round_ in range(args.rounds):
            speeds = {}
            for tuning in args.tunings:
                command = [sys.executable, __file__, *common, "--child", model_dir, tuning]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"{tuning}: {done.stderr[-3000:]}")
                row = {**json.loads(done.stdout.splitlines()[-1]), "round": round_ + 1}
                rows.append(row)
                speeds[tuning] = row["steps_per_s"]
                ratio = row["steps_per_s"] / speeds.get("full", row["steps_per_s"])
                print(
                    f"| {round_ + 1} | {tuning} | {row['trainable_params'] / 1e6:.2f} M | "
                    f"{row['wavlm_trainable_params'] / 1e6:.2f} M | {row['steps_per_s']:.3f} | "
                    f"{ratio:.2f} | {row['peak_mb']:.0f} |",
                    flush=True,
                )
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
