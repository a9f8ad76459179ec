"""The README demo over several training seeds: each number's mean and spread, and the run time.

One seed's numbers published as exact mislead a reader who reruns the demo with another seed, or
on another machine (whose CPU kernels change the training too). For each seed this runs README's
demo command,

    python recipes/train_speaker_embeddings.py hparams/synthetic_demo.yaml --seed S
        --output_folder OUTPUT_ROOT/S

(one after another, timed; ``--reuse`` reads a seed's finished run instead of training it again,
with no time), reads its ``verification_{dev,eval}.json`` and prints one row per seed, then the
mean, the standard deviation (n - 1) and the min-max of each number over the seeds.

    python tests/benchmarks/demo_seeds.py --seeds 1986 7 42 [--reuse] [--json seeds.json]

Any other option goes to every run, after the seed: ``--output_root results/heads/ecapa
--head_type ecapa`` trains the demo with the ECAPA head (docs/results.md "Speaker heads").

Run it from the repository (the demo synthesizes its corpus under ``results/`` on first use).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The reported numbers: (label, split, condition, metric).
COLUMNS = (
    ("eval EER %", "eval", "pooled", "eer"),
    ("eval minDCF", "eval", "pooled", "min_dcf"),
    ("eval actDCF", "eval", "pooled", "act_dcf"),
    ("eval Cllr", "eval", "pooled", "cllr"),
    ("eval TC-vs-TW EER %", "eval", "TC-vs-TW", "eer"),
    ("eval TC-vs-IC EER %", "eval", "TC-vs-IC", "eer"),
    ("valid EER %", "valid", "pooled", "eer"),
    ("valid minDCF", "valid", "pooled", "min_dcf"),
)


def run_demo(seed: int, folder: Path, overrides=()) -> float:
    """Train and score the demo with ``seed`` (and ``overrides``) into ``folder``; its seconds."""
    command = [
        sys.executable, str(ROOT / "recipes" / "train_speaker_embeddings.py"),
        str(ROOT / "hparams" / "synthetic_demo.yaml"), "--seed", str(seed),
        "--output_folder", str(folder), "--noprogressbar", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def run_numbers(folder: Path) -> dict:
    """The ``COLUMNS`` of a finished demo run."""
    reports = {
        split: json.loads((folder / f"verification_{split}.json").read_text())["conditions"]
        for split in ("valid", "eval")
    }
    return {label: reports[split][cond][metric] for label, split, cond, metric in COLUMNS}


def summary(rows: dict) -> dict:
    """Mean, standard deviation and min-max of each column over the seeds."""
    stats = {}
    for label, *_ in COLUMNS:
        values = [row[label] for row in rows.values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        stats[label] = {
            "mean": statistics.mean(values), "std": spread,
            "min": min(values), "max": max(values),
        }  # fmt: skip
    return stats


def markdown(rows: dict, times: dict, stats: dict) -> str:
    """One row per seed (with its run time), then mean ± std and min-max."""
    labels = [label for label, *_ in COLUMNS]
    lines = [
        "| seed | " + " | ".join(labels) + " | run time |",
        "|---|" + "---:|" * (len(labels) + 1),
    ]
    for seed, row in rows.items():
        took = times.get(seed)
        clock = "-" if not took else "{} min {} s".format(*divmod(round(took), 60))
        shown = " | ".join(_shown(k, row[k]) for k in labels)
        lines.append(f"| {seed} | {shown} | {clock} |")
    mean = " | ".join(
        f"{_shown(k, stats[k]['mean'])} ± {_shown(k, stats[k]['std'])}" for k in labels
    )
    lines.append(f"| mean ± std | {mean} | |")
    span = " | ".join(f"{_shown(k, stats[k]['min'])}-{_shown(k, stats[k]['max'])}" for k in labels)
    lines.append(f"| min-max | {span} | |")
    return "\n".join(lines)


def _shown(label: str, value: float) -> str:
    """A number as the README prints it: two decimals for percentages, three for costs."""
    return f"{value:.2f}" if "%" in label else f"{value:.3f}"


def main() -> None:
    """Run (or read) the demo for every seed; print the table; optionally write it as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1986, 7, 42])
    parser.add_argument("--output_root", type=Path, default=ROOT / "results" / "demo_seeds")
    parser.add_argument("--reuse", action="store_true", help="read a seed's finished run")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args, overrides = parser.parse_known_args()
    rows, times = {}, {}
    for seed in args.seeds:
        folder = args.output_root / str(seed)
        if not (args.reuse and (folder / "verification_eval.json").is_file()):
            times[seed] = run_demo(seed, folder, overrides)
        rows[seed] = run_numbers(folder)
        print(f"seed {seed}: eval EER {rows[seed]['eval EER %']:.2f} %", flush=True)
    stats = summary(rows)
    print(markdown(rows, times, stats))
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "seconds": times, "summary": stats}))


if __name__ == "__main__":
    main()
