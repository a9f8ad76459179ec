"""Settings are checked at start-up: every bad value named with what is allowed, nothing built."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hyperpyyaml import load_hyperpyyaml

from recipes import experiment
from recipes.evaluation import scoring
from recipes.settings import choices, raw_settings, settings_problems
from tests.helpers import ROOT

BAD_VALUES = {
    "target_type": "foo",
    "head_type": "bar",
    "margin_type": "arc",
    "scale_mode": "auto",
    "batch_sampler": "bucket",
    "score_norm": "asnorm",
    "on_bad_audio": "ignore",
    "export_operating_point": "frr",
    "precision": "fp8",
    "eval_precision": "int8",
    "fusion": "bayes",
    "phrase_branch": "yes",
    "phrase_pooling": "mean",
    "phrase_classifier_type": "softmax",
    "phrase_margin": -0.2,
    "number_of_epochs": 0,
    "batch_size": -4,
    "crop_seconds": 0,
    "max_eval_seconds": -1.0,
    "dev_speakers": 0,
    "phrase_loss_weight": -0.5,
    "l2sp_weight": -0.01,
    "cohort_top_k": 0,
    "cohort_utts_per_speaker": 0,
    "fusion_prior": 1.5,
}


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_each_setting_is_checked_with_its_allowed_values(key):
    value = BAD_VALUES[key]
    settings = raw_settings(ROOT / "hparams" / "synthetic_demo.yaml", {key: value})
    problems = settings_problems(settings)
    assert len(problems) == 1 and problems[0].startswith(f"{key}: {value!r}"), problems
    allowed = choices(settings).get(key)
    assert allowed is None or ", ".join(map(str, allowed)) in problems[0]


def test_impossible_combinations_are_named():
    demo = ROOT / "hparams" / "synthetic_demo.yaml"
    problems = settings_problems(raw_settings(demo, {"phrase_branch": False}))
    assert problems == ["fusion: 'llr' needs phrase_branch: True (or none)"]
    no_layers = "wavlm: !new:recipes.model.modules.WavLMEncoder\n    layer_weighting: False"
    problems = settings_problems(raw_settings(demo, no_layers))
    assert problems == ["phrase_branch: True needs the WavLM encoder's layer_weighting: True"]
    problems = settings_problems(
        raw_settings(demo, {"phrase_classifier_type": "linear", "phrase_margin": 0.2})
    )
    assert problems == ["phrase_margin: 0.2 needs phrase_classifier_type: cosine"]
    problems = settings_problems(raw_settings(demo, no_layers + "\nhead_type: mhfa"))
    assert "head_type: 'mhfa' needs the WavLM encoder's layer_weighting: True" in problems
    assert (
        settings_problems(raw_settings(ROOT / "hparams" / "wavlm_td.yaml", {"data_folder": "x"}))
        == []
    )


def test_reading_raw_settings_leaves_hyperpyyaml_alone(tmp_path):
    raw_settings(ROOT / "hparams" / "synthetic_demo.yaml", {"output_folder": str(tmp_path)})
    with open(ROOT / "hparams" / "synthetic_demo.yaml", encoding="utf-8") as handle:
        text = handle.read().split("# ------------------------------------------------------------"
                                   "---------------- model")[0]  # fmt: skip
    hparams = load_hyperpyyaml(text, {"output_folder": str(tmp_path)})
    assert hparams["save_folder"] == f"{tmp_path}/save"  # !ref still resolved


def test_bad_settings_are_named_before_data_prep(tmp_path):
    command = [
        sys.executable, str(ROOT / "recipes" / "train_speaker_embeddings.py"),
        str(ROOT / "hparams" / "synthetic_demo.yaml"), "--output_folder", str(tmp_path / "exp"),
        "--data_folder", str(tmp_path / "nowhere"), "--score_norm", "asnorm",
        "--fusion", "bayes", "--number_of_epochs", "-1",
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert time.perf_counter() - start < 30  # imports included; nothing is built or prepared
    assert result.returncode != 0
    assert "score_norm: 'asnorm' is not one of none, s-norm, as-norm" in result.stderr
    assert "fusion: 'bayes' is not one of none, llr, gate" in result.stderr
    assert "number_of_epochs: -1 must be a number >= 1" in result.stderr
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "exp" / "prep").exists()


def test_a_choice_added_where_the_code_dispatches_is_allowed_with_no_second_list(monkeypatch):
    demo = ROOT / "hparams" / "synthetic_demo.yaml"
    wanted = {"score_norm": "z-norm", "batch_sampler": "bucket"}
    assert len(settings_problems(raw_settings(demo, wanted))) == 2
    monkeypatch.setattr(scoring, "METHODS", (*scoring.METHODS, "z-norm"))
    monkeypatch.setitem(experiment.BATCH_SAMPLERS, "bucket", experiment.BATCH_SAMPLERS["random"])
    assert settings_problems(raw_settings(demo, wanted)) == []
    # A speaker head is chosen among the YAML's own ``heads``: wiring one in allows it.
    head = "heads:\n    resnet: !name:recipes.model.speaker_model.XVectorHead\nhead_type: resnet"
    assert settings_problems(raw_settings(demo, head)) == []
