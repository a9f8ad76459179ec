"""Time EER + minDCF: ours against SpeechBrain's at 10k and 100k trials, ours alone at 1M and 10M.

Peak memory per call is tracemalloc's (numpy buffers are traced); the process's peak RSS closes
the table.

    python tests/benchmarks/bench_metrics.py            # 10k, 100k, 1M, 10M
    python tests/benchmarks/bench_metrics.py --sizes 100000
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.evaluation.metrics import eer, min_dcf


def scores(n: int, seed: int = 0):
    """1 % targets, as in the challenge's cost model; scores like a decent system's."""
    rng = np.random.default_rng(seed)
    n_target = max(1, n // 100)
    return rng.normal(2.5, 1, n_target), rng.normal(0, 1, n - n_target)


def run_ours(targets, nontargets):
    """Both metrics, ours."""
    return eer(targets, nontargets)[0], min_dcf(targets, nontargets)[0]


def run_speechbrain(targets, nontargets):
    """Both metrics, SpeechBrain's (its minDCF with the SdSV costs, normalized like ours).

    Its minDCF builds a thresholds x trials matrix; where that cannot be allocated we report NaN.
    """
    from speechbrain.utils.metric_stats import EER, minDCF

    t, n = torch.from_numpy(targets).float(), torch.from_numpy(nontargets).float()
    try:
        dcf = float(minDCF(t, n, c_miss=10.0, c_fa=1.0, p_target=0.01)[0]) / 0.1
    except RuntimeError as error:  # torch's "can't allocate memory"
        print(f"SpeechBrain minDCF at {len(t) + len(n):,} trials: {str(error).splitlines()[0]}")
        dcf = float("nan")
    return EER(t, n)[0], dcf


def measure(function, targets, nontargets):
    """Seconds, tracemalloc peak (MB) and the results of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    result = function(targets, nontargets)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, result


def main() -> None:
    """Print one table row per (implementation, size)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000]
    )
    args = parser.parse_args()
    print("| trials | implementation | seconds | peak MB | EER % | minDCF | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        targets, nontargets = scores(n)
        ours = measure(run_ours, targets, nontargets)
        rows = [("ours", ours)]
        if n <= 100_000:
            rows.append(("SpeechBrain", measure(run_speechbrain, targets, nontargets)))
        for name, (seconds, peak, (eer_value, dcf)) in rows:
            ratio = seconds / ours[0]
            print(
                f"| {n:,} | {name} | {seconds:.3f} | {peak:.0f} | {100 * eer_value:.3f} | "
                f"{dcf:.4f} | {ratio:.1f}x |"
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess peak RSS: {rss:.0f} MB")


if __name__ == "__main__":
    main()
