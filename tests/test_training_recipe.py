"""The training recipe: variants, real-data YAML, and a short run that learns and resumes.

Every YAML variant builds and backpropagates; a short run learns, checkpoints, resumes and
re-evaluates; the real-data YAML loads with a local WavLM.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.dataloader import make_dataloader

from data_prep.corpus import file_digest
from data_prep.manifests import read_list
from recipes.evaluation.metrics import eer
from recipes.evaluation.verification import embed_tables
from recipes.experiment import best_checkpoint, checkpoint_model, dataio_prep
from recipes.train_speaker_embeddings import brain_for_data, build_brain
from tests.helpers import (
    ROOT,
    experiment_record,
    fake_batch,
    load_yaml,
    run_script,
    two_at_a_time,
)

SMALL_HEAD = {"emb_dim": 64}  # the YAML's head widths stay; a smaller embedding keeps it quick


@pytest.mark.parametrize(
    ("head_type", "margin_type", "scale_mode", "target_type"),
    [
        ("xvector", "am", "fixed", "speaker"),
        ("xvector", "aam", "adaptive", "speaker_phrase"),
        ("ecapa", "am", "adaptive", "speaker_phrase"),
        ("ecapa", "aam", "fixed", "speaker"),
        ("mhfa", "aam", "fixed", "speaker_phrase"),
    ],
)
def test_every_variant_builds_and_backpropagates(
    tmp_path, tiny_wavlm_dir, head_type, margin_type, scale_mode, target_type
):
    hparams = load_yaml(
        "synthetic_demo.yaml",
        {
            "output_folder": str(tmp_path),
            "wavlm_source": tiny_wavlm_dir,
            "head_type": head_type,
            "margin_type": margin_type,
            "scale_mode": scale_mode,
            "target_type": target_type,
            "noise_csv": None,
            **SMALL_HEAD,
        },
    )
    brain = build_brain(hparams, {"device": "cpu"}, n_classes=3, n_phrases=2)
    brain.hparams.epoch_counter.current = 1
    brain.modules.train()
    batch = fake_batch()
    predictions = brain.compute_forward(batch, brain_stage("TRAIN"))
    loss = brain.compute_objectives(predictions, batch, brain_stage("TRAIN"))
    loss.backward()
    assert torch.isfinite(loss)
    model = brain.modules.embedding_model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    wavlm_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in wavlm_grads)
    outputs = brain.compute_forward(batch, brain_stage("VALID"))
    assert outputs["speaker"].shape == (4, 1, 64) and outputs["phrase_logp"].shape == (4, 2)
    branch = model.phrase_branch
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.head.parameters())


def brain_stage(name):
    return getattr(sb.Stage, name)


def real_yaml(tmp_path, tiny_wavlm_dir, **overrides):
    """``hparams/wavlm_td.yaml`` with the tiny local WavLM in place of WavLM Base+."""
    return load_yaml(
        "wavlm_td.yaml",
        {
            "data_folder": str(tmp_path / "data"),
            "output_folder": str(tmp_path / "out"),
            "wavlm_source": tiny_wavlm_dir,
            "wavlm_hidden_size": 96,
            **overrides,
        },
    )


def test_real_yaml_loads_with_a_local_wavlm(tmp_path, tiny_wavlm_dir):
    hparams = real_yaml(tmp_path, tiny_wavlm_dir)
    wavlm = hparams["wavlm"]
    assert wavlm.model.config.layerdrop == 0.0 and not wavlm.freeze
    frozen = [p.requires_grad for p in wavlm.model.feature_extractor.parameters()]
    assert not any(frozen)  # the real config freezes the CNN encoder
    embeddings = hparams["embedding_model"]()(torch.randn(2, 16000), torch.tensor([1.0, 0.7]))
    assert embeddings.shape == (2, 1, hparams["emb_dim"])
    assert hparams["number_of_epochs"] >= 10 and hparams["precision"] == "fp16"


def test_real_yaml_with_mhfa_and_l2sp_runs_a_training_step(tmp_path, tiny_wavlm_dir):
    """``wavlm_td.yaml --head_type mhfa`` with a local WavLM: one optimizer step, L2-SP on."""
    hparams = real_yaml(tmp_path, tiny_wavlm_dir, head_type="mhfa", noise_csv=None)
    assert hparams["l2sp_weight"] == 0.01
    cpu = {"device": "cpu", "precision": "fp32", "eval_precision": "fp32"}
    brain = build_brain(hparams, cpu, n_classes=3, n_phrases=2)
    brain.hparams.epoch_counter.current = 2  # past the frozen-WavLM warm-up
    brain.on_fit_start()
    assert brain.l2sp is not None and brain.l2sp().item() == 0.0
    keys = brain.modules.embedding_model.head.key_layer_logits
    assert keys.abs().max() == 0  # MHFA's key layer weights start uniform
    loss = brain.fit_batch(fake_batch())
    assert torch.isfinite(loss)
    assert brain.l2sp().item() > 0  # WavLM moved away from its pretrained weights
    assert keys.abs().max() > 0  # and the keys' layer weights learn


def epoch_losses(log: Path) -> list[float]:
    return [float(x) for x in re.findall(r"train loss: ([0-9.e+-]+)", log.read_text())]


@pytest.mark.slow
def test_short_run_learns_checkpoints_and_reports(trained):
    out, output = trained
    losses = epoch_losses(out / "train_log.txt")
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    log = (out / "train_log.txt").read_text()
    waits = [float(x) for x in re.findall(r"data_wait_share: ([0-9.e+-]+)", log)]
    assert len(waits) == 3 and all(0 <= w < 1 for w in waits), waits
    checkpoints = list((out / "save").glob("CKPT*"))
    assert checkpoints and all((c / "CKPT.yaml").is_file() for c in checkpoints)
    assert "Going into epoch 1" in output
    report = json.loads((out / "verification_valid.json").read_text())
    assert set(report["conditions"]) == {"pooled", "TC-vs-IC", "TC-vs-TW", "TC-vs-IW"}
    assert set(report["by_language"]) == {"persian", "english"} and len(report["by_phrase"]) == 10
    for split in ("valid", "eval"):  # the synthetic eval trials have a key, so both are scored
        assert (out / f"det_{split}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_verify_script_outputs_agree_with_each_other(trained, tiny_corpus):
    out, _ = trained
    output = run_script(
        "verify_speakers.py", out, tiny_corpus, "--score_norm", "as-norm", "--cohort_top_k", "2"
    )
    # The step logs as training does: INFO lines on the console, and into the run's log.txt.
    log = (out / "log.txt").read_text()
    assert "fusion: learned on" in output and "fusion: learned on" in log
    assert "verify_speakers.py trials" in log.split("step on")[-1]
    lines = (out / "scores_eval.txt").read_text().splitlines()
    trials = [line.fields for line in read_list(tiny_corpus / "docs" / "trials.txt")]
    assert [line.split()[:2] for line in lines] == [list(t) for t in trials]
    answer = (out / "answer.txt").read_text().split()
    assert len(answer) == len(trials)
    assert [float(a) for a in answer] == pytest.approx(
        [float(x.split()[2]) for x in lines], abs=1e-6
    )
    # The JSON metrics are those of the score file.
    labels = np.array([x.split()[-2] == "1" for x in lines])
    scores = np.array([float(x.split()[2]) for x in lines])
    report = json.loads((out / "verification_eval.json").read_text())
    assert report["conditions"]["pooled"]["eer"] == pytest.approx(
        100 * eer(scores[labels], scores[~labels])[0]
    )
    # Embeddings are cached per checkpoint: rescoring needs no model.
    assert list((out / "embeddings").glob("*/eval.npy")) and list(
        (out / "embeddings").glob("*/cohort.npy")
    )
    # ... and only for its weights: the record names the model file's digest, so a checkpoint
    # folder whose weights were replaced under the same name is embedded again.
    records = [
        (r, out / "save" / r.parent.name / "embedding_model.ckpt")
        for r in (out / "embeddings").glob("CKPT*/settings.json")
    ]
    records = [(r, model) for r, model in records if model.is_file()]  # kept checkpoints
    assert records
    for record, model_file in records:
        assert json.loads(record.read_text())["model"] == file_digest(model_file)


@pytest.mark.slow
def test_rerun_resumes_and_finished_run_only_reevaluates(trained, tiny_corpus):
    out, _ = trained
    resumed = run_script("train_speaker_embeddings.py", out, tiny_corpus, "--number_of_epochs", "4")
    assert "Going into epoch 1" not in resumed and "Going into epoch 4" in resumed
    assert len(epoch_losses(out / "train_log.txt")) == 4
    finished = run_script(
        "train_speaker_embeddings.py", out, tiny_corpus, "--number_of_epochs", "4"
    )
    assert "Going into epoch" not in finished and "pooled" in finished


def test_verify_without_a_checkpoint_says_so(tmp_path, tiny_corpus):
    verify = [
        sys.executable, str(ROOT / "recipes" / "verify_speakers.py"), "trials",
        str(ROOT / "hparams" / "verification.yaml"), "--output_folder", str(tmp_path),
    ]  # fmt: skip
    record = experiment_record(tmp_path, tiny_corpus)  # an experiment, never trained
    calls = [
        verify,
        [*verify, "--run_hparams", str(record)],
        [*verify, "--emb_dim", "64"],
        [*verify, "--score_norm", "asnorm"],
        [*verify[:3], str(ROOT / "hparams" / "synthetic_demo.yaml")],  # no verification.yaml
    ]
    no_run, untrained, not_a_setting, not_a_choice, old_style = two_at_a_time(_stderr, calls)
    assert "hyperparams.yaml not found" in no_run
    assert "--output_folder must be the output folder of a training run" in no_run
    assert "no checkpoint with a validation EER" in untrained
    assert not (tmp_path / "exp" / "prep").exists()  # refused before data prep
    assert "emb_dim: not a setting of" in not_a_setting
    assert "score_norm: 'asnorm' is not one of" in not_a_choice
    assert "names no run (run_hparams)" in old_style


def _stderr(command) -> str:
    """The standard error of a command that must fail."""
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode != 0
    return result.stderr


@pytest.mark.slow
def test_bf16_on_cpu_runs(tmp_path, tiny_corpus):
    output = run_script(
        "train_speaker_embeddings.py", tmp_path / "exp", tiny_corpus,
        "--precision", "bf16", "--eval_precision", "bf16",
        "--number_of_epochs", "1",
    )  # fmt: skip
    assert "Using training precision: `--precision=bf16`" in output


@pytest.mark.slow
def test_scoring_model_reproduces_the_trained_brain(trained, tiny_corpus):
    """Final scoring's model (built from hparams + checkpoint, no Brain) is the Brain's model."""
    out, _ = trained
    overrides = {
        "output_folder": str(out), "data_folder": str(tiny_corpus), "synthetic_corpus": None,
        "valid_speakers": 2, "emb_dim": 64, "noise_csv": None, "cohort_utts_per_speaker": 2,
    }  # fmt: skip
    hparams = load_yaml("synthetic_demo.yaml", overrides)
    settings = hparams["recipe_settings"]
    data = dataio_prep(settings.corpus, settings.audio)
    checkpoint = best_checkpoint(settings.model.checkpointer)
    model = checkpoint_model(settings.model, checkpoint, len(data.phrase_encoder))
    dev = data.splits["valid"].utterances.filtered_sorted(select_n=12)
    tables = embed_tables(model, dev, {"batch_size": 4}, torch.device("cpu"), progress=False)
    brain = brain_for_data(hparams, {"device": "cpu", "noprogressbar": True}, data)
    brain.checkpointer.recover_if_possible(min_key="EER")
    brain.modules.eval()
    with torch.no_grad():
        for batch in make_dataloader(dev, batch_size=4):
            outputs = brain.compute_forward(batch, sb.Stage.TEST)
            for name, values in outputs.items():
                expected = values.reshape(values.shape[0], -1).numpy()
                got = tables[name].matrix[tables[name].rows(batch.id, name)]
                assert np.abs(got - expected).max() < 1e-5, name
