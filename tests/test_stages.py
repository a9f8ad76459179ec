"""Training in stages: LoRA / frozen WavLM, ``init_from`` a run or an export, text-independent data.

The unit tests build the demo's model; the end-to-end ones chain tiny runs of the recipe (a LoRA
run, its export, runs that start from each) on the tests' corpora.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import onnx
import pytest
import torch
from speechbrain.nnet.adapters import LoRA
from speechbrain.utils.checkpoints import Checkpointer

from recipes.experiment import assembled_model, best_checkpoint
from recipes.init_from import INIT_RECORD, Source, check_fits, load_source
from recipes.model.adaptation import merge_lora, merged_state
from recipes.settings import settings_problems
from recipes.train_speaker_embeddings import build_brain
from tests.conftest import KALDI_EN30
from tests.helpers import ROOT, load_yaml, run_script, run_script_command


def _model(tmp_path, wavlm_dir, n_phrases=3, **settings):
    """The demo YAML's model (tiny WavLM) with ``settings``, as training assembles it."""
    overrides = {"output_folder": str(tmp_path), "wavlm_source": wavlm_dir, "noise_csv": None}
    hparams = load_yaml("synthetic_demo.yaml", {**overrides, **settings})
    return assembled_model(hparams["recipe_settings"].model, n_phrases), hparams


def _trainable(model) -> list[str]:
    """The names of the parameters that train."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_lora_trains_only_its_adapters_the_layer_weights_and_the_heads(tmp_path, tiny_wavlm_dir):
    model, _ = _model(tmp_path, tiny_wavlm_dir, wavlm_tuning="lora", wavlm_attention="sdpa")
    layers = model.encoder.model.config.num_hidden_layers
    trainable = _trainable(model)
    in_wavlm = [name for name in trainable if name.startswith("encoder.")]
    assert len(in_wavlm) == layers * 4 * 2  # q, k, v, out: a down and an up projection each
    assert all("adapter_down_proj" in n or "adapter_up_proj" in n for n in in_wavlm)
    rest = {name.split(".")[0] for name in trainable if not name.startswith("encoder.")}
    assert rest == {"layer_logits", "head", "phrase_branch"}
    full, _ = _model(tmp_path / "full", tiny_wavlm_dir)
    assert sum(p.numel() for n, p in model.named_parameters() if n in in_wavlm) < 0.1 * sum(
        p.numel() for n, p in full.encoder.model.named_parameters() if p.requires_grad
    )
    frozen, _ = _model(tmp_path / "frozen", tiny_wavlm_dir, wavlm_tuning="frozen")
    assert not [n for n in _trainable(frozen) if n.startswith("encoder.")]
    assert {n.split(".")[0] for n in _trainable(frozen)} == rest


def test_a_frozen_wavlm_has_no_optimizer_of_its_own(tmp_path, tiny_wavlm_dir):
    overrides = {"output_folder": str(tmp_path), "wavlm_source": tiny_wavlm_dir, "noise_csv": None}
    hparams = load_yaml("synthetic_demo.yaml", {**overrides, "wavlm_tuning": "frozen"})
    brain = build_brain(hparams, {"device": "cpu"}, n_classes=3, n_phrases=2)
    brain.init_optimizers()
    assert list(brain.optimizers_dict) == ["head"]


def test_merged_adapters_compute_what_the_adapted_model_did(tmp_path, tiny_wavlm_dir):
    model, hparams = _model(
        tmp_path, tiny_wavlm_dir, wavlm_tuning="lora", wavlm_attention="sdpa", lora_rank=4,
        lora_targets=["q_proj", "v_proj", "intermediate_dense", "output_dense"],
    )  # fmt: skip
    model.eval()
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, parameter in model.named_parameters():
            if "adapter_" in name:
                parameter.copy_(0.05 * torch.randn_like(parameter))
    wav = 0.1 * torch.randn(2, 16000)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted = model(wav)
        assert merge_lora(model.encoder.model) == 4 * model.encoder.model.config.num_hidden_layers
        merged = model(wav)
    assert not any(isinstance(m, LoRA) for m in model.modules())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    # The same fold from a checkpoint's state dict (a new stage reads a LoRA run so).
    folded = merged_state(state, hparams["lora_alpha"] / hparams["lora_rank"])
    assert folded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(folded[key], value, atol=1e-6, rtol=1e-5)


def test_lora_settings_are_checked_at_start_up():
    problems = settings_problems(
        {"wavlm_tuning": "lora", "wavlm_attention": "eager", "lora_targets": ["q_proj"]}
    )
    assert problems == [
        "wavlm_tuning: 'lora' on ['q_proj'] needs wavlm_attention: sdpa (eager attention reads "
        "the projections' weights past any adapter)"
    ]
    assert not settings_problems(  # the feed-forward layers are adapted with either attention
        {"wavlm_tuning": "lora", "wavlm_attention": "eager", "lora_targets": ["output_dense"]}
    )
    problems = settings_problems(
        {"wavlm_tuning": "adapters", "lora_targets": ["query"], "lora_rank": 0}
    )
    assert problems == [
        "wavlm_tuning: 'adapters' is not one of full, lora, frozen",
        "lora_targets: ['query'] must be a list of distinct ones of ('q_proj', 'k_proj', "
        "'v_proj', 'out_proj', 'intermediate_dense', 'output_dense')",
        "lora_rank: 0 must be a whole number >= 1",
    ]


def test_a_source_is_loaded_where_it_fits_and_its_classes_match(tmp_path, tiny_wavlm_dir):
    source_model, _ = _model(tmp_path / "a", tiny_wavlm_dir, n_phrases=3)
    with torch.no_grad():
        for parameter in source_model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model_file = tmp_path / "embedding_model.ckpt"
    torch.save(source_model.state_dict(), model_file)
    classifier = torch.nn.Linear(4, 5)
    source = Source(
        tmp_path, "run", model_file, source_model.state_dict(), classifier.state_dict(),
        list("abcde"), ["p1", "p2", "p3"],
    )  # fmt: skip
    model, _ = _model(
        tmp_path / "b", tiny_wavlm_dir, n_phrases=4, wavlm_tuning="lora", wavlm_attention="sdpa"
    )
    check_fits(source, model)
    ours = torch.nn.Linear(4, 5)
    record = load_source(source, model, ours, {"class": list("abcde"), "phrase": ["p1", "p2"]})
    assert record["loaded"] == ["encoder", "head", "layer_logits", "phrase_branch", "classifier"]
    assert record["fresh"] == [
        "LoRA adapters (zero update)",
        "the phrase classifier (other phrases)",
    ]
    assert torch.equal(ours.weight, classifier.weight)
    theirs = source_model.state_dict()
    for key, value in model.state_dict().items():
        plain = key.replace(".pretrained_module.", ".")
        if "adapter_" not in key and not key.startswith("phrase_branch.classifier"):
            assert torch.equal(value, theirs[plain]), key
    with torch.no_grad():  # the adapters start at zero: the model computes the source's
        wav = 0.1 * torch.randn(1, 16000)
        torch.testing.assert_close(model.eval()(wav), source_model.eval()(wav), atol=1e-5, rtol=0)

    other, _ = _model(tmp_path / "c", tiny_wavlm_dir, emb_dim=32)
    with pytest.raises(
        SystemExit, match=r"the speaker head differs \(head.embedding.bias: \[192\]"
    ):
        check_fits(source, other)


# ------------------------------------------------------------------------------------------------
# End to end: a LoRA run, its export, runs that start from each
# ------------------------------------------------------------------------------------------------
LORA = ("--wavlm_tuning", "lora", "--wavlm_attention", "sdpa")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_corpus):
    """A 2-epoch LoRA run of the tiny demo: its output folder."""
    out = tmp_path_factory.mktemp("lora") / "exp"
    run_script("train_speaker_embeddings.py", out, tiny_corpus, "--number_of_epochs", "2", *LORA)
    return out


@pytest.fixture(scope="module")
def lora_export(lora_run):
    """The export of ``lora_run`` (its self-checks pass, or the export fails)."""
    run_script("export_model.py", lora_run, None)
    return lora_run / "export"


@pytest.mark.slow
def test_a_lora_run_resumes_exactly(lora_run, tiny_corpus, tmp_path):
    """One epoch, then the same command for two: what the uninterrupted run trained."""
    out = tmp_path / "resumed"
    run_script("train_speaker_embeddings.py", out, tiny_corpus, "--number_of_epochs", "1", *LORA)
    run_script("train_speaker_embeddings.py", out, tiny_corpus, "--number_of_epochs", "2", *LORA)
    weights = [
        torch.load(_best(run) / "embedding_model.ckpt", weights_only=True)
        for run in (out, lora_run)
    ]
    assert any("adapter_up_proj" in key for key in weights[0])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    assert (out / "scores_eval.txt").read_bytes() == (lora_run / "scores_eval.txt").read_bytes()


def _best(run):
    """The checkpoint folder that final scoring used (the lowest validation EER)."""
    return best_checkpoint(Checkpointer(run / "save")).path


@pytest.mark.slow
def test_the_export_of_a_lora_run_is_a_plain_wavlm(lora_export):
    facts = json.loads((lora_export / "export.json").read_text())
    assert facts["checks"]["speechbrain_min_cosine"] > 0.9999
    state = torch.load(lora_export / "embedding_model.ckpt", weights_only=True)
    assert not [k for k in state if "adapter_" in k or "pretrained_module" in k]
    graph = onnx.load(lora_export / "model.onnx", load_external_data=False).graph
    names = [n.name for n in graph.initializer] + [n.name for n in graph.node]
    assert names and not [n for n in names if "adapter" in n or "pretrained_module" in n]


@pytest.mark.slow
def test_runs_start_from_a_run_or_an_export_and_record_it(
    lora_run, lora_export, tiny_corpus, tmp_path
):
    from_run = tmp_path / "from_run"
    output = run_script(
        "train_speaker_embeddings.py", from_run, tiny_corpus, "--number_of_epochs", "1",
        "--init_from", str(lora_run),
    )  # fmt: skip
    record = json.loads((from_run / INIT_RECORD).read_text())
    assert record["kind"] == "run" and record["init_from"] == str(lora_run)
    assert record["loaded"] == ["encoder", "head", "layer_logits", "phrase_branch", "classifier"]
    assert f"init_from {lora_run} (run): loaded encoder" in output
    assert (from_run / "answer.txt").is_file()
    run_script("export_model.py", from_run, None)
    assert (from_run / "export" / "export.json").is_file()

    from_export = tmp_path / "from_export"
    run_script(
        "train_speaker_embeddings.py", from_export, tiny_corpus, "--number_of_epochs", "1",
        "--init_from", str(lora_export), *LORA,
    )  # fmt: skip
    record = json.loads((from_export / INIT_RECORD).read_text())
    assert record["kind"] == "export"
    assert "the speaker classifier (the source has none)" in record["fresh"]
    assert (from_export / "answer.txt").is_file()

    # A resume from another source, or from a source that changed since, is refused.
    command = run_script_command(
        "train_speaker_embeddings.py", from_export, tiny_corpus, "--number_of_epochs", "2",
        "--init_from", str(lora_run), *LORA,
    )  # fmt: skip
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert refused.returncode != 0
    assert f"init_from: '{lora_export}' (now '{lora_run}')" in refused.stderr
    changed = dict(record, sha1="0" * 40)
    (from_export / INIT_RECORD).write_text(json.dumps(changed))
    command = [a if a != str(lora_run) else str(lora_export) for a in command]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert refused.returncode != 0 and "changed since it started" in refused.stderr


@pytest.mark.slow
def test_a_source_of_another_shape_or_kind_is_refused_before_data_prep(
    lora_run, tiny_corpus, tmp_path
):
    for source, expected in (
        (lora_run, "the speaker head differs (head.embedding.bias: [64] in the source, [32] here"),
        (tmp_path, "neither a run's output folder"),
    ):
        out = tmp_path / "exp"
        command = run_script_command(
            "train_speaker_embeddings.py", out, tiny_corpus, "--init_from", str(source),
        )  # fmt: skip
        command = [a if a != "--emb_dim=64" else "--emb_dim=32" for a in command]
        refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert refused.returncode != 0 and expected in refused.stderr, refused.stderr[-2000:]
        assert not (out / "prep").exists()


# ------------------------------------------------------------------------------------------------
# A text-independent first stage
# ------------------------------------------------------------------------------------------------
def _text_independent_copy(corpus, folder):
    """``corpus`` (Kaldi layout) without transcripts, its trials of the plain form."""
    folder.mkdir()
    for name in ("train", "enroll", "test"):
        shutil.copytree(corpus / name, folder / name)
        (folder / name / "text").unlink(missing_ok=True)
    (folder / "wav").symlink_to(corpus / "wav")
    lines = (corpus / "trials").read_text().splitlines()
    (folder / "trials").write_text("".join(" ".join(line.split()[:3]) + "\n" for line in lines))
    return folder


@pytest.mark.slow
def test_a_text_independent_kaldi_corpus_trains_speakers_and_scores(kaldi_corpus, tmp_path):
    corpus = _text_independent_copy(kaldi_corpus, tmp_path / "voxceleb_style")
    common = (
        "--corpus", "kaldi", "--enrol_utts", str(KALDI_EN30["enrol_utts"]),
        "--number_of_epochs", "1", "--audio_outside_data_folder", "True",
    )  # fmt: skip
    command = run_script_command("train_speaker_embeddings.py", tmp_path / "td", corpus, *common)
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert refused.returncode != 0
    assert "phrase_branch: True: a phrase classifier needs two phrases or more" in refused.stderr
    out = tmp_path / "ti"
    output = run_script(
        "train_speaker_embeddings.py", out, corpus, *common,
        "--phrase_branch", "False", "--fusion", "none", "--target_type", "speaker",
    )  # fmt: skip
    assert "a text-independent corpus, one phrase" in output
    report = json.loads((out / "verification_eval.json").read_text())
    assert set(report["conditions"]) == {"pooled"} and report["trials"] == 540
    trials = (corpus / "trials").read_text().splitlines()
    assert len((out / "answer.txt").read_text().splitlines()) == len(trials)
