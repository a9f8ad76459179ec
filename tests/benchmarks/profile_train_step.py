"""Where a Base+ sized training step spends its time: the recipe's and a plain WavLMForXVector's.

Profiles (``torch.profiler``, CPU time of each operator, self time, so nothing is counted twice)
``--steps`` training steps of each, after a warm-up step, at the same model, batch and lengths as
``bench_train.py`` (batch 4 of DeepMine-like lengths sorted into the batch, CNN frozen as
``wavlm_td.yaml``, speaker model only), and groups the operators:

- matrix products (``mm``, ``addmm``, ``bmm``, ``linear`` and their backward);
- convolutions (the CNN, the positional convolution, the TDNN head);
- attention's softmax, normalizations, element-wise and the rest;
- the optimizer.

A step can only get much faster if the share it can change is large: the table says how large.

    python tests/benchmarks/profile_train_step.py --precision fp32
    python tests/benchmarks/profile_train_step.py --precision bf16 --steps 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from tests.benchmarks.bench_train import transformers_step, transformers_trainer
from tests.benchmarks.common import model_dirs, training_batches, training_brain

#: Operator name fragments of each group, tried in this order (the first that matches).
GROUPS = {
    "matrix products": ("mm", "addmm", "bmm", "linear", "matmul", "baddbmm", "dot"),
    "convolutions": ("convolution", "conv1d", "conv_depthwise", "mkldnn_convolution"),
    "optimizer": ("adam", "_foreach", "_fused"),
    "softmax / attention": ("softmax", "scaled_dot_product", "_flash_attention", "attention"),
    "normalizations": ("norm", "layer_norm", "group_norm", "batch_norm"),
}


def group_of(name: str) -> str:
    """The group of an operator name (``GROUPS``), or ``OTHER``."""
    lowered = name.lower()
    for group, fragments in GROUPS.items():
        if any(fragment in lowered for fragment in fragments):
            return group
    return OTHER


def profiled(step, batches) -> dict:
    """Self CPU seconds per group over ``batches`` (after the first, a warm-up).

    Also the largest operators of ``OTHER``, by name.
    """
    batches = list(batches)
    step(batches[0][0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch, _ in batches[1:]:
            step(batch)
    totals, other = defaultdict(float), {}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        totals[group_of(event.key)] += seconds
        if group_of(event.key) == OTHER:
            other[event.key] = seconds
    largest = dict(sorted(other.items(), key=lambda item: -item[1])[:TOP_OTHER])
    return {"groups": dict(totals), "largest_other": largest}


#: The group of operators that no fragment names, and how many of its largest are listed.
OTHER, TOP_OTHER = "element-wise and other", 8


def recipe_step(model_dir, precision: str, attention: str, tmp):
    """One ``fit_batch`` of the recipe's speaker model (bench_train's recipe rows)."""
    brain = training_brain(
        model_dir, "base_plus", tmp, {"device": "cpu", "precision": precision},
        freeze_cnn=True, augment=False, phrase_branch=False, fusion="none",
        wavlm_attention=attention,
    )  # fmt: skip

    def step(batch):
        """A training step."""
        brain.step += 1
        brain.fit_batch(batch)

    return step


def hf_step(model_dir, precision: str):
    """One step of ``WavLMForXVector`` with a plain AdamW loop (bench_train's rows)."""
    model, optimizer = transformers_trainer(model_dir, True, False, "cpu")
    scaler = torch.amp.GradScaler(enabled=False)
    return lambda batch: transformers_step(model, optimizer, scaler, batch, precision, "cpu")


def main() -> None:
    """Profile both, print the table of shares, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--json", default="profile_train_step.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dirs(tmp, ["base_plus"])["base_plus"]
        steps = {
            "recipe (sdpa)": recipe_step(model_dir, args.precision, "sdpa", Path(tmp) / "r"),
            "WavLMForXVector": hf_step(model_dir, args.precision),
        }
        for name, step in steps.items():
            batches = training_batches(args.batch_size, args.steps + 1, bucketing=True)
            results[name] = profiled(step, batches)
    groups = [*GROUPS, OTHER]
    print(
        f"Self CPU seconds per step by operator group ({args.precision}, batch {args.batch_size})"
    )
    print("| group | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for group in groups:
        cells = []
        for totals in (r["groups"] for r in results.values()):
            total = sum(totals.values())
            seconds = totals.get(group, 0.0) / args.steps
            cells.append(f"{seconds:.2f} s ({100 * totals.get(group, 0.0) / total:.0f} %)")
        print(f"| {group} | " + " | ".join(cells) + " |")
    sums = [f"{sum(r['groups'].values()) / args.steps:.2f} s" for r in results.values()]
    print("| total | " + " | ".join(sums) + " |")
    for name, result in results.items():
        largest = ", ".join(
            f"{op} {seconds / args.steps:.2f} s" for op, seconds in result["largest_other"].items()
        )
        print(f"\n{name}, largest of {OTHER}: {largest}")
    Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": results}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
