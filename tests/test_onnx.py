"""The ONNX copy of a model: the same embeddings at any length, refused when it disagrees.

A tiny random embedder (the export's ``WavLMFromConfig``, attention on SDPA as the YAMLs train
it) is exported as ``recipes/export_model.py`` exports a folder's model; onnxruntime must give
PyTorch's embeddings at lengths other than the one the graph was traced at, and the torch-free
verifier must check audio as the SpeechBrain folder does. The whole path (export of a trained
run, ``--backend onnx``, the torch-free example) is in ``tests/test_export.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from recipes.export_model import check_onnx
from recipes.model.onnx_verifier import OnnxVerifier
from recipes.model.speaker_model import WavLMFromConfig, WavLMSpeakerEmbedder, XVectorHead
from recipes.model.trial_decisions import AudioRefused
from recipes.onnx_export import (
    ONNX_INT8_MODEL,
    graph_agreement,
    speaker_decisions,
    write_onnx_models,
)
from recipes.tiny_wavlm import TINY

AUDIO = SimpleNamespace(sample_rate=16000, min_audio_seconds=0.3, max_eval_seconds=6.0)


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    """A tiny embedder, the folder holding its ONNX models, and its decision data."""
    torch.manual_seed(0)
    head = XVectorHead(96, (32, 32, 32, 32, 64), embedding_dim=16)
    model = WavLMSpeakerEmbedder(WavLMFromConfig(TINY, attention="sdpa"), head).eval()
    folder = tmp_path_factory.mktemp("onnx")
    assert write_onnx_models(folder, model, AUDIO) == ("speaker",)
    thresholds = {"eer": {"1": 0.5}, "min_dcf": {"1": 0.6}}
    return model, folder, speaker_decisions(AUDIO, thresholds)


def test_the_onnx_graph_embeds_like_pytorch_at_any_length(onnx_folder):
    model, folder, decisions = onnx_folder
    generator = torch.Generator().manual_seed(1)
    wavs = [torch.randn(n, generator=generator) * 0.1 for n in (4800, 23457, 96000)]
    fp32 = OnnxVerifier(folder, decisions=decisions, complete=False)
    agreement = graph_agreement(fp32, model, wavs)
    assert agreement["onnx_min_cosine"] > 0.9999
    int8 = OnnxVerifier(folder, ONNX_INT8_MODEL, decisions=decisions, complete=False)
    assert int8.session.get_inputs()[0].shape[1] == "samples"  # any length
    assert graph_agreement(int8, model, wavs)["onnx_min_cosine"] > 0.9


def test_the_onnx_verifier_checks_audio_and_decides_with_the_folder_thresholds(
    onnx_folder, tmp_path
):
    _, folder, decisions = onnx_folder
    verifier = OnnxVerifier(folder, decisions=decisions, complete=False)
    rng = np.random.default_rng(0)
    speech = tmp_path / "speech.wav"
    sf.write(speech, 0.1 * rng.standard_normal(16000), 16000)
    sf.write(tmp_path / "narrowband.wav", 0.1 * rng.standard_normal(8000), 8000)
    sf.write(tmp_path / "silent.wav", np.zeros(16000), 16000)
    sf.write(tmp_path / "long.wav", 0.1 * rng.standard_normal(16000 * 8), 16000)
    with pytest.raises(ValueError, match=r"narrowband\.wav: sampled at 8000 Hz; this model takes"):
        verifier.load_audio(tmp_path / "narrowband.wav")
    with pytest.raises(AudioRefused, match=r"silent\.wav: no speech energy"):
        verifier.load_audio(tmp_path / "silent.wav")
    assert verifier.load_audio(tmp_path / "long.wav").shape == (16000 * 6,)  # max_eval_seconds
    score, accept = verifier.verify_files(speech, tmp_path / "long.wav")
    assert accept == (score >= 0.5)  # the calibrated 1-utterance EER threshold
    assert verifier.verify_trial([speech], speech).speaker_score == pytest.approx(1.0, abs=1e-6)


def test_an_onnx_model_that_decides_otherwise_is_refused_naming_each_difference():
    agreeing = {
        "onnx_min_cosine": 0.99999,
        "onnx_phrase_max_logp_difference": 1e-5,
        "onnx_max_score_difference": 1e-4,
        "onnx_decisions_differing": 0,
    }
    check_onnx(agreeing)
    differing = {**agreeing, "onnx_min_cosine": 0.98, "onnx_decisions_differing": 2}
    with pytest.raises(RuntimeError, match=r"cosine 0\.980000; 2 validation decisions differ"):
        check_onnx(differing)
    with pytest.raises(RuntimeError, match=r"validation trial scores differ by up to 5\.00e-02"):
        check_onnx({**agreeing, "onnx_max_score_difference": 0.05})
