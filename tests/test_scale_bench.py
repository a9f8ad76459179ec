"""The real-scale dry run (tests/benchmarks/bench_scale.py) runs end to end at a small scale."""

from __future__ import annotations

import json
import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

import bench_scale


def test_every_stage_runs_and_is_reported(tmp_path):
    out = tmp_path / "stages.json"
    bench_scale.main(["--scale", "0.001", "--json", str(out), "--workdir", str(tmp_path)])
    stages = json.loads(out.read_text())
    assert [s["stage"] for s in stages] == list(bench_scale.STAGES)
    assert all(s["seconds"] > 0 and s["peak_mb"] > 0 for s in stages)
    final = stages[bench_scale.STAGES.index("final_scoring")]
    assert {"answer.txt", "scores_eval.txt", "det_eval.png", "verification_eval.json"} <= set(
        final["written"]
    )
    counts = bench_scale.real_counts(0.001)
    assert final["eval_trials"] > 0 and stages[0]["valid_trials"] > 0
    assert counts["valid_speakers"] >= 2


def test_the_drawn_trials_have_every_condition_and_no_repeat():
    counts = {**bench_scale.real_counts(0.001), "eval_speakers": 5, "trials": 15000}
    models, tests, conditions = bench_scale.draw_trials(counts)
    assert set(conditions) == {"TC", "TW", "IC", "IW"}
    pairs = models.astype(int) * 10**6 + tests
    assert len(set(pairs.tolist())) == len(pairs)
    # Every model meets all 15 tests of its own phrase (TC) and 135 of its other phrases (TW).
    assert (conditions == "TC").sum() == 50 * 15 and (conditions == "TW").sum() == 50 * 135
