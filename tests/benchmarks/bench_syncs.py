"""Host-device syncs per training step of ``SpeakerBrain``, by the line of code that makes them.

A sync (reading a GPU value into Python, a copy to the host, a data-sized output such as
``x[mask]``) stops the host from queueing the next kernels until the GPU has caught up. This
audit needs no GPU: ``common.HostSyncCounter`` sees every tensor operation of real ``fit_batch``
calls (as ``hparams/synthetic_demo.yaml`` wires them, augmentation on) and counts the ones that
would sync on a GPU. On a CPU every tensor counts, so the totals are an upper bound; the table
says where each comes from.

    python tests/benchmarks/bench_syncs.py                        # fp32 and bf16, 4 steps each
    python tests/benchmarks/bench_syncs.py --precisions bf16 --scale_mode adaptive
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from tests.benchmarks.common import count_host_syncs, model_dirs, training_batches, training_brain


def syncs_per_step(model_dir, precision: str, args, tmp) -> collections.Counter:
    """Mean count per (site, operation) over ``args.steps`` steps after one untimed step."""
    brain = training_brain(
        model_dir,
        "tiny",
        tmp,
        {"device": "cpu", "precision": precision},
        freeze_cnn=args.freeze_cnn,
        scale_mode=args.scale_mode,
    )
    sites = count_host_syncs(brain, training_batches(args.batch_size, 1 + args.steps, False))
    return collections.Counter({site: n / args.steps for site, n in sites.items()})


def main() -> None:
    """Audit each precision; print one table per precision and write all counts as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--freeze_cnn", action="store_true", help="as wavlm_td.yaml")
    parser.add_argument("--scale_mode", default="fixed", choices=["fixed", "adaptive"])
    parser.add_argument("--json", default="bench_syncs.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dirs(tmp, ["tiny"])["tiny"]
        for precision in args.precisions:
            counts = syncs_per_step(model_dir, precision, args, tmp)
            results[precision] = {f"{site} {op}": n for (site, op), n in counts.items()}
            print(f"\n{precision}: {sum(counts.values()):.1f} host syncs per step")
            print("| syncs/step | operation | where |\n|---:|---|---|")
            for (site, op), n in sorted(counts.items(), key=lambda item: -item[1]):
                print(f"| {n:.1f} | `{op}` | {site} |")
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
