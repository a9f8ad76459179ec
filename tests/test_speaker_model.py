"""The embedding model does not depend on padding, so evaluation can batch utterances.

SpeechBrain's wrapper normalizes the padded waveform and WavLM's first GroupNorm runs over padded
frames; the recipe takes both statistics over each utterance's valid part, and the head pools
over exactly the valid frames.
"""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2

from recipes.model.modules import L2SP, WavLMEncoder
from recipes.model.speaker_model import (
    ATTENTION_KINDS,
    MaskedGroupNorm,
    MHFAHead,
    TDSVSpeakerRecognition,
    XVectorHead,
    sdpa_self_attention,
)
from recipes.model.trial_decisions import OTHER_PHRASE
from tests.helpers import load_yaml

LENGTHS = (48000, 37001, 21111, 16003, 8000)


def padded(seed=0):
    """Waveforms of different lengths and loudness, alone and as one zero-padded batch."""
    generator = torch.Generator().manual_seed(seed)
    wavs = [torch.randn(n, generator=generator) * 0.05 * (i + 1) for i, n in enumerate(LENGTHS)]
    batch = torch.zeros(len(wavs), max(LENGTHS))
    for i, wav in enumerate(wavs):
        batch[i, : len(wav)] = wav
    return wavs, batch, torch.tensor(LENGTHS) / max(LENGTHS)


@pytest.mark.parametrize("head_type", ["xvector", "ecapa", "mhfa"])
def test_a_batched_utterance_gets_the_embedding_it_gets_alone(tmp_path, tiny_wavlm_dir, head_type):
    hparams = load_yaml(
        "synthetic_demo.yaml",
        {"output_folder": str(tmp_path), "wavlm_source": tiny_wavlm_dir, "head_type": head_type},
    )
    model = hparams["embedding_model"]().eval()  # the recipe's model, as training builds it
    wavlm = model.encoder
    assert isinstance(wavlm.model.feature_extractor.conv_layers[0].layer_norm, MaskedGroupNorm)
    wavs, batch, lens = padded()

    def embed(wav, wav_lens):
        return F.normalize(model(wav, wav_lens).squeeze(1), dim=-1)

    def speechbrain_features(wav, wav_lens):
        return Wav2Vec2.extract_features(wavlm, wav, wav_lens)

    with torch.no_grad():
        alone = torch.cat([embed(w[None], None) for w in wavs])
        batched = embed(batch, lens)
        # SpeechBrain's own feature code on the same model: padding leaks in.
        with mock.patch.object(wavlm, "extract_features", speechbrain_features):
            plain = embed(batch, lens)
    ours, theirs = (alone - batched).abs().max(), (alone - plain).abs().max()
    if head_type != "ecapa":  # no padding in x-vector convolutions or MHFA's attention: exact
        assert ours < 1e-5 and theirs > 20 * ours  # (the test can tell the difference)
    else:  # ECAPA's "same"-padded convolutions see padding at an utterance's end (0.5 s in 3 s:
        # cosine 0.9988, measured), so only the WavLM part is padding-free
        assert (alone * batched).sum(-1).min() > 0.995 and ours < theirs


def test_masked_group_norm_is_group_norm_on_full_length_input():
    norm = torch.nn.GroupNorm(8, 8)
    norm.weight.data.normal_()
    masked = MaskedGroupNorm(8, 8)
    masked.load_state_dict(norm.state_dict())
    x = torch.randn(3, 8, 50)
    masked.valid_frames = torch.tensor([50, 50, 50])
    assert torch.allclose(masked(x), norm(x), atol=1e-5)
    masked.valid_frames = torch.tensor([50, 20, 7])
    out = masked(x)
    assert torch.allclose(out[2:, :, :7], norm(x[2:, :, :7]), atol=1e-5)


def test_head_pools_over_valid_frames_only():
    head = XVectorHead(12, (16, 16, 16, 16, 24), embedding_dim=8).eval()
    x = torch.randn(1, 40, 12)
    padded_x = torch.cat([x, 100 * torch.ones(1, 25, 12)], dim=1)
    with torch.no_grad():
        assert torch.allclose(head(x), head(padded_x, torch.tensor([40 / 65])), atol=1e-5)


def test_gradient_checkpointing_recomputes_the_masked_cnn_norm_alike(tmp_path, tiny_wavlm_dir):
    """The checkpointed first CNN layer runs again in backward with the same valid lengths."""
    _, batch, lens = padded()
    grads = []
    for checkpointing in (False, True):
        wavlm = WavLMEncoder(
            tiny_wavlm_dir,
            str(tmp_path),
            freeze_feature_extractor=False,
            gradient_checkpointing=checkpointing,
        ).train()
        wavlm(batch, lens).pow(2).mean().backward()
        grads.append(wavlm.model.feature_extractor.conv_layers[0].conv.weight.grad)
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("freeze_cnn", [False, True])
def test_a_frozen_cnn_is_left_out_of_the_backward_pass(tmp_path, tiny_wavlm_dir, freeze_cnn):
    """With a frozen CNN autograd builds no graph through it; the transformer still learns."""
    wavlm = WavLMEncoder(tiny_wavlm_dir, str(tmp_path), freeze_feature_extractor=freeze_cnn).train()
    cnn_outputs = []
    wavlm.model.feature_extractor.register_forward_hook(
        lambda module, inputs, output: cnn_outputs.append(output)
    )
    _, batch, lens = padded()
    wavlm(batch, lens).pow(2).mean().backward()
    assert cnn_outputs[0].requires_grad is not freeze_cnn
    cnn_grad = wavlm.model.feature_extractor.conv_layers[0].conv.weight.grad
    assert (cnn_grad is None) is freeze_cnn
    assert wavlm.model.encoder.layers[0].attention.out_proj.weight.grad.abs().max() > 0


def test_mhfa_attends_over_valid_frames_only_and_each_head_pools_on_its_own():
    head = MHFAHead(12, num_states=4, compression_dim=8, heads=3, embedding_dim=6).eval()
    hidden = torch.randn(4, 1, 40, 12)
    frames = hidden.mean(0)
    padding = 100 * torch.ones(4, 1, 25, 12)
    with torch.no_grad():
        alone = head(frames, None, hidden)
        padded_out = head(
            torch.cat([frames, padding[0]], 1),
            torch.tensor([40 / 65]),
            torch.cat([hidden, padding], 2),
        )
        assert alone.shape == (1, 1, 6) and torch.allclose(alone, padded_out, atol=1e-5)
        # the keys' layer weights matter: another weighting, another embedding
        head.key_layer_logits[0] = 5.0
        assert (head(frames, None, hidden) - alone).abs().max() > 1e-3
    with pytest.raises(ValueError, match="MHFA needs all 4 hidden states"):
        head(frames, None, hidden[:2])


def test_l2sp_is_zero_at_the_pretrained_weights_and_pulls_back_toward_them(
    tmp_path, tiny_wavlm_dir
):
    wavlm = WavLMEncoder(tiny_wavlm_dir, str(tmp_path), freeze_feature_extractor=True)
    trainable = [p for p in wavlm.model.parameters() if p.requires_grad]
    cnn = next(wavlm.model.feature_extractor.parameters())
    l2sp = L2SP(trainable, weight=0.01)
    assert l2sp().item() == 0.0 and all(p is not cnn for p in l2sp.parameters)
    pretrained = [p.detach().clone() for p in trainable]
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.01)
    penalty = l2sp()
    moved = sum(float((p - q).pow(2).sum()) for p, q in zip(trainable, pretrained, strict=True))
    assert penalty.item() == pytest.approx(0.01 * moved, rel=1e-4)
    penalty.backward()
    for p, q in zip(trainable, pretrained, strict=True):  # gradient = 2 w (theta - theta_0)
        assert torch.allclose(p.grad, 0.02 * (p.detach() - q), atol=1e-8)
    with torch.no_grad():  # a small step against the gradient brings the weights closer
        for p in trainable:
            p.sub_(10.0 * p.grad)
    assert l2sp().item() < penalty.item()


def _recognizer(labels):
    """A ``TDSVSpeakerRecognition`` that knows only its phrase classes (no model is loaded)."""
    verifier = object.__new__(TDSVSpeakerRecognition)
    verifier.hparams = SimpleNamespace(phrase_labels=labels)
    return verifier


def _outputs(*recognized, labels):
    """Phrase outputs of files each recognized as one class (its log-posterior near 0)."""
    return [
        {"phrase_logp": torch.log_softmax(10.0 * F.one_hot(torch.tensor(labels.index(r)),
                                                          len(labels)).float(), dim=0)}
        for r in recognized
    ]  # fmt: skip


def test_the_enrolled_phrase_is_what_was_asked_or_a_named_error():
    labels = ["01", "06", "10", OTHER_PHRASE]
    verifier = _recognizer(labels)
    assert verifier.enrolled_phrase([], "06") == "06"
    assert verifier.enrolled_phrase([], "custom") == "custom"
    with pytest.raises(ValueError, match=r"phrase '6' is not a pass-phrase.*did you mean '06'"):
        verifier.enrolled_phrase([], "6")  # not silently "custom"
    for unknown in ("99", OTHER_PHRASE):
        with pytest.raises(ValueError, match="not a pass-phrase of this model"):
            verifier.enrolled_phrase([], unknown)
    assert verifier.enrolled_phrase(_outputs("10", "10", "10", labels=labels)) == "10"
    with pytest.raises(ValueError, match=r"different pass-phrases \(01, 06, 01\)"):
        verifier.enrolled_phrase(_outputs("01", "06", "01", labels=labels))


def test_sdpa_attention_gives_eager_attentions_outputs_and_gradients(tmp_path, tiny_wavlm_dir):
    """The "sdpa" path computes transformers' attention: padded batch, fp32, to 1e-5."""
    encoders = {}
    for kind in ATTENTION_KINDS:
        overrides = {"output_folder": str(tmp_path), "wavlm_source": tiny_wavlm_dir}
        hparams = load_yaml("synthetic_demo.yaml", {**overrides, "wavlm_attention": kind})
        encoders[kind] = hparams["wavlm"]
        encoders[kind].model.config.attention_dropout = 0.0
    assert encoders["sdpa"].attention == "sdpa" and encoders["eager"].attention == "eager"
    encoders["sdpa"].load_state_dict(encoders["eager"].state_dict())
    _, batch, lens = padded()
    outputs, gradients = {}, {}
    for kind, encoder in encoders.items():
        encoder.train()
        for layer in encoder.model.encoder.layers:  # dropout off: the same draws are not shared
            layer.attention.dropout = 0.0
        hidden = encoder(batch, lens)
        hidden.pow(2).mean().backward()
        outputs[kind] = hidden.detach()
        gradients[kind] = encoder.model.encoder.layers[0].attention.q_proj.weight.grad
    assert (outputs["sdpa"] - outputs["eager"]).abs().max() < 1e-5
    scale = gradients["eager"].abs().max()
    assert (gradients["sdpa"] - gradients["eager"]).abs().max() < 1e-5 * max(1.0, float(scale))
    with torch.no_grad():  # and the layers really run another way: the hook of the sdpa path
        calls = []
        attention = encoders["sdpa"].model.encoder.layers[0].attention
        original = attention.torch_multi_head_self_attention
        attention.torch_multi_head_self_attention = lambda *a: calls.append(1) or original(*a)
        encoders["sdpa"](batch, lens)
        assert calls and original.func is sdpa_self_attention
