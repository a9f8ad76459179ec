"""Settings are checked at start-up: every bad value named with what is allowed, nothing built."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
import ruamel.yaml
from hyperpyyaml import load_hyperpyyaml

from recipes import experiment
from recipes.evaluation.verification import ScoringSettings
from recipes.export_model import run_replacements
from recipes.setting_rules import PATH
from recipes.settings import (
    DECLARED,
    FREE,
    RULES,
    choices,
    raw_settings,
    settings_problems,
    with_replacements,
)
from recipes.verify_speakers import scoring_replacements
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
    "phrase_margin": -0.2,
    "number_of_epochs": 0,
    "batch_size": -4,
    "crop_seconds": 0,
    "max_eval_seconds": -1.0,
    "valid_speakers": 0,
    "phrase_loss_weight": -0.5,
    "l2sp_weight": -0.01,
    "cohort_top_k": 0,
    "cohort_utts_per_speaker": 0,
    "fusion_prior": 1.5,
    "skip_bad": "no",  # a string, which Python would take as true
    "augment": 1,
    "scale": 0,
    "margin": 2,
    "warmup_steps": 2.5,
    "lr_wavlm": -1,
    "grad_accumulation_factor": 0,
    "min_audio_seconds": 0.001,
    "num_workers": -1,
    "emb_dim": 0,
    "seed": -3,
    "max_grad_norm": 0,
    "lr_decay_factor": 1.5,
    "max_data_wait_share": 2,
    "total_steps": 10.5,
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
    problems = settings_problems(raw_settings(demo, no_layers + "\nhead_type: mhfa"))
    assert "head_type: 'mhfa' needs the WavLM encoder's layer_weighting: True" in problems
    problems = settings_problems(raw_settings(demo, {"fusion_quality": ["duration", "snr"]}))
    assert problems == [
        "fusion_quality: ['duration', 'snr'] must be a list of distinct ones of "
        "('duration', 'cohort')"
    ]
    assert settings_problems(raw_settings(demo, {"fusion_quality": ["cohort", "duration"]})) == []
    kept_workers = "train_dataloader_options:\n    batch_size: 8\n    persistent_workers: True"
    problems = settings_problems(raw_settings(demo, kept_workers))
    assert len(problems) == 1 and problems[0].startswith(
        "train_dataloader_options: persistent_workers must be False: the crops are keyed"
    )
    assert (
        settings_problems(raw_settings(ROOT / "hparams" / "wavlm_td.yaml", {"data_folder": "x"}))
        == []
    )
    # What makes training meaningless: a margin the loss cannot overcome, a crop too short.
    assert settings_problems(raw_settings(demo, {"margin": 1.2})) == [
        "margin: 1.2 must be below 1 for margin_type 'am': the loss could not fall"
    ]
    assert settings_problems(raw_settings(demo, {"margin": 1.2, "margin_type": "aam"})) == []
    assert settings_problems(raw_settings(demo, {"margin": 1.6, "margin_type": "aam"}))
    problems = settings_problems(raw_settings(demo, {"crop_seconds": 0.01}))
    assert problems == [
        "crop_seconds: 0.01 must be at least 0.025 (WavLM's receptive field, 400 samples at "
        "sample_rate 16000)"
    ]


def _top_level_keys(path) -> list[str]:
    """A YAML's top-level keys, nothing resolved or built."""
    return list(ruamel.yaml.YAML(typ="rt").load(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "hparams").glob("*.yaml")))
def test_every_setting_of_every_yaml_is_checked_or_said_to_be_free(name):
    checked = {key for key, check in RULES.items() if check is not PATH} | {"head_type"}
    keys = _top_level_keys(ROOT / "hparams" / name)
    unlisted = [k for k in keys if k not in checked and k not in FREE and not k.startswith("__")]
    assert unlisted == [], "give each a rule beside its settings field or in settings.OWN_RULES"
    assert not checked & set(FREE)  # a key is either checked or free


def test_the_settings_objects_fields_declare_their_own_rules():
    """A scoring or corpus setting is checked by the rule beside its field, with no other list."""
    keys = set(_top_level_keys(ROOT / "hparams" / "synthetic_demo.yaml"))
    classes = (
        experiment.CorpusSettings, experiment.AudioSettings, experiment.SamplingSettings,
        experiment.ModelWiring, ScoringSettings,
    )  # fmt: skip
    for cls in classes:
        for field in dataclasses.fields(cls):
            if field.name in keys and field.name not in FREE:
                assert field.name in DECLARED, f"{cls.__name__}.{field.name} declares no rule"
    field = {f.name: f for f in dataclasses.fields(ScoringSettings)}["cohort_top_k"]
    assert RULES["cohort_top_k"] is field.metadata["check"]


def test_a_setting_given_twice_is_named(tmp_path):
    demo = ROOT / "hparams" / "synthetic_demo.yaml"
    with pytest.raises(SystemExit, match="batch_size is given twice on the command line"):
        raw_settings(demo, "batch_size: 8\nbatch_size: 16")
    twice = tmp_path / "twice.yaml"
    twice.write_text(demo.read_text() + "\nbatch_size: 4\n")
    line = len(demo.read_text().splitlines()) + 2
    with pytest.raises(
        SystemExit, match=rf"batch_size is given twice in \S+twice.yaml \(line {line}\)"
    ):
        raw_settings(twice, "")


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
    assert "number_of_epochs: -1 must be a whole number >= 1" in result.stderr
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "exp" / "prep").exists()


def test_a_choice_added_where_the_code_dispatches_is_allowed_with_no_second_list(monkeypatch):
    demo = ROOT / "hparams" / "synthetic_demo.yaml"
    wanted = {"on_bad_audio": "warn", "batch_sampler": "bucket"}
    assert len(settings_problems(raw_settings(demo, wanted))) == 2
    monkeypatch.setitem(experiment.BAD_AUDIO_ACTIONS, "warn", None)
    monkeypatch.setitem(experiment.BATCH_SAMPLERS, "bucket", experiment.BATCH_SAMPLERS["random"])
    assert settings_problems(raw_settings(demo, wanted)) == []
    # A speaker head is chosen among the YAML's own ``heads``: wiring one in allows it.
    head = "heads:\n    resnet: !name:recipes.model.speaker_model.XVectorHead\nhead_type: resnet"
    assert settings_problems(raw_settings(demo, head)) == []


def test_layout_settings_are_named():
    demo = ROOT / "hparams" / "synthetic_demo.yaml"
    kaldi = {"corpus": "kaldi", "synthetic_corpus": None, "dev_key_file": "keys/dev.txt"}
    assert settings_problems(raw_settings(demo, kaldi)) == [
        "dev_key_file: keys a DeepMine list pair; corpus 'kaldi' labels its trials in its own "
        "trials file"
    ]
    layout = "synthetic_corpus:\n    speakers: 8\n    layout: tdsv"
    assert settings_problems(raw_settings(demo, layout)) == [
        "synthetic_corpus: layout 'tdsv' is not one of sdsv, tdsv2024"
    ]
    assert settings_problems(raw_settings(demo, {"valid_enrol_utts": 0})) == [
        "valid_enrol_utts: 0 must be a whole number >= 1"
    ]


def _settings_fields() -> set[str]:
    """The field names of every settings object the training YAMLs build (``RecipeSettings``)."""
    classes = (
        experiment.CorpusSettings, experiment.AudioSettings, experiment.SamplingSettings,
        ScoringSettings, experiment.ModelWiring,
    )  # fmt: skip
    return {field.name for cls in classes for field in dataclasses.fields(cls)}


@pytest.mark.parametrize("step", ["verification.yaml", "export.yaml"])
def test_each_key_a_step_replaces_reaches_a_settings_object(step):
    """A record holds its settings objects resolved: a replaced key must be set on a field."""
    replacements = {"verification.yaml": scoring_replacements, "export.yaml": run_replacements}
    step_hparams = load_hyperpyyaml((ROOT / "hparams" / step).read_text(), {"output_folder": "/a"})
    keys = set(replacements[step](step_hparams))
    assert keys and keys <= _settings_fields()


def test_a_replaced_key_is_set_on_the_settings_object_that_has_it():
    corpus = experiment.CorpusSettings(
        "/data/old", "/prep", "deepmine", 2, 1, True, False, 3, 0.3, None, 5, False
    )
    settings = experiment.RecipeSettings(
        corpus,
        experiment.AudioSettings(16000, 2.0, 8.0, 0.3, "fail", "/log", "speaker", 5, "/save"),
        experiment.SamplingSettings("random", {}, 1, "fail"),
        ScoringSettings("/runs/a", "none", 10, "llr", 0.09, "fp32", {}, 8.0, 16000, ["cohort"]),
        experiment.ModelWiring(None, None, None),
    )
    replaced = {"data_folder": "/data/new", "fusion_quality": ["duration"], "score_norm": "s-norm"}
    new = with_replacements(settings, replaced)
    assert new.corpus.data_folder == "/data/new" and corpus.data_folder == "/data/old"
    assert new.scoring.fusion_quality == ("duration",) and new.scoring.score_norm == "s-norm"
    assert new.scoring.output_folder == "/runs/a" and new.audio == settings.audio
