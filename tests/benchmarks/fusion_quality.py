"""Quality-aware fusion: minDCF, actDCF and Cllr of trained runs with and without each measure.

For each trained run (an experiment folder) and each set of quality measures (``fusion_quality``:
none, duration, cohort, both), rescores the run's best checkpoint with the recipe's own command,

    python recipes/verify_speakers.py trials hparams/verification.yaml --output_folder RUN
        --fusion_quality "[duration]"

(embeddings come from the run's cache, the fusion is learned on its dev trials) and reads the eval
report it writes (``verification_eval[_quality-<measures>].json``). Prints the table docs/design.md
publishes, each change relative to no measure, and which measures pass the rule that sets the
default: actual DCF lower on every run, minDCF at most 2 % (relative) higher on any.

    python tests/benchmarks/fusion_quality.py RUN [RUN ...] [--json table.json]

Run it from the folder the runs were trained in (their recorded data folders may be relative).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository

from recipes.evaluation.verification import quality_tag  # noqa: E402

MEASURE_SETS = ((), ("duration",), ("cohort",), ("duration", "cohort"))
METRICS = ("eer", "min_dcf", "act_dcf", "cllr")
#: A measure becomes the default only if it costs at most this much minDCF (relative) anywhere.
MAX_MIN_DCF_LOSS = 0.02


def rescored(run: Path, measures: tuple[str, ...]) -> dict:
    """The pooled eval metrics of ``run`` rescored with the quality measures ``measures``."""
    command = [
        sys.executable, str(ROOT / "recipes" / "verify_speakers.py"), "trials",
        str(ROOT / "hparams" / "verification.yaml"), "--output_folder", str(run),
        "--fusion_quality", f"[{', '.join(measures)}]", "--noprogressbar",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    report = run / f"verification_{'_'.join(filter(None, ['eval', quality_tag(measures)]))}.json"
    pooled = json.loads(report.read_text())["conditions"]["pooled"]
    return {name: pooled[name] for name in METRICS}


def relative(value: float, base: float) -> float:
    """The relative change of ``value`` from ``base`` (0.05: 5 % higher)."""
    return value / base - 1 if base else 0.0


def passing_measures(table: dict) -> list[str]:
    """The measure sets that lower actDCF on every run and cost at most 2 % minDCF on any."""
    passing = []
    for measures in MEASURE_SETS[1:]:
        name = "+".join(measures)
        rows = [(results[name], results["none"]) for results in table.values()]
        if all(
            row["act_dcf"] < base["act_dcf"]
            and relative(row["min_dcf"], base["min_dcf"]) <= MAX_MIN_DCF_LOSS
            for row, base in rows
        ):
            passing.append(name)
    return passing


def markdown(table: dict) -> str:
    """The table as Markdown: one row per run and measure set, changes relative to none."""
    lines = [
        "| run | fusion_quality | EER % | minDCF | actDCF | Cllr | minDCF change | actDCF change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, results in table.items():
        base = results["none"]
        for name, row in results.items():
            changes = [relative(row[m], base[m]) for m in ("min_dcf", "act_dcf")]
            lines.append(
                f"| {run} | {name} | {row['eer']:.2f} | {row['min_dcf']:.3f} | "
                f"{row['act_dcf']:.3f} | {row['cllr']:.3f} | "
                + " | ".join(f"{c:+.1%}" for c in changes)
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    """Rescore every run with every measure set; print the table and the rule's verdict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trained experiment folders")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()
    table = {}
    for run in args.runs:
        table[str(run)] = {
            "+".join(measures) or "none": rescored(run, measures) for measures in MEASURE_SETS
        }
        print(f"rescored {run}", flush=True)
    print(markdown(table))
    passing = passing_measures(table)
    print(f"passing the default rule: {', '.join(passing) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"runs": table, "passing": passing}, indent=2))


if __name__ == "__main__":
    main()
