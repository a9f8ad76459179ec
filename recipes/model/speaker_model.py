"""The speaker embedding model as used after training, and its SpeechBrain inference interface.

- ``XVectorHead``: projector + TDNN stack + statistics pooling + embedding, laid out exactly like
  the head of ``transformers.WavLMForXVector`` so that weights can be exchanged with it.
- ``PhraseBranch``: the pass-phrase classifier on the same WavLM forward pass (its own layer
  weights and pooling head), for text-dependent scoring.
- ``WavLMSpeakerEmbedder``: WavLM, weighted layer sum, a speaker head and optionally the phrase
  branch: the one model that training runs, scoring loads and an exported folder ships (there
  with ``WavLMFromConfig``, WavLM built from its config instead of loaded from model files).
- ``fused_llr``: a trial's named features (``TRIAL_FEATURES``: speaker, phrase and content
  scores) -> calibrated log-likelihood ratio (the fusion's ``CALIBRATIONS``, learned by
  ``recipes/evaluation/fusion.py``, stored as plain numbers in the exported ``hyperparams.yaml``).
- ``TDSVSpeakerRecognition``: SpeechBrain's ``SpeakerRecognition`` interface with embeddings
  computed one utterance at a time, several enrollment utterances, thresholds calibrated on the
  dev trials (or Bayes decisions on fused LLRs, with the reason of a reject), and audio of any
  sample rate or channel count.

This file imports only torch, SpeechBrain and transformers: ``recipes/export_model.py`` copies it
into every exported model folder (as ``tdsv_speaker_model.py``), where SpeechBrain's
``foreign_class`` loads it, so an exported folder works without this repository.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from speechbrain.dataio import audio_io
from speechbrain.inference.speaker import SpeakerRecognition
from torch import nn
from transformers import WavLMConfig, WavLMModel

logger = logging.getLogger(__name__)


def masked_mean_var(x: torch.Tensor, mask: torch.Tensor, dim: int, correction: int = 0):
    """Mean and variance of ``x`` over ``dim`` where ``mask`` (0/1, broadcastable) is set.

    The masked statistics of the head's pooling and the waveform normalization (``correction``
    1: unbiased variance); ``MaskedGroupNorm`` has a faster form for its large tensor. Results
    keep ``dim``.
    """
    count = mask.sum(dim, keepdim=True)
    mean = (x * mask).sum(dim, keepdim=True) / count.clamp(min=1)
    var = (((x - mean) * mask) ** 2).sum(dim, keepdim=True) / (count - correction).clamp(min=1)
    return mean, var


def masked_mean_std(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean and (unbiased) std over the valid frames of ``x`` ``[B, T, C]`` -> ``[B, 2C]``.

    ``lengths`` are frame counts. Vectorized, and deterministic: SpeechBrain's
    ``StatisticsPooling`` loops over utterances and adds random noise to the mean even at eval.
    """
    mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
    mean, var = masked_mean_var(x, mask[..., None], dim=1, correction=1)
    return torch.cat([mean, var.clamp(min=1e-8).sqrt()], dim=-1).squeeze(1)


class XVectorHead(nn.Module):
    """x-vector head with the layout of ``transformers.WavLMForXVector``.

    projector (Linear) -> TDNN layers (dilated Conv1d + ReLU [+ BatchNorm], no padding) ->
    mean+std pooling over valid frames -> embedding (Linear). Returns ``[B, 1, embedding_dim]``
    like SpeechBrain's embedding models.
    """

    def __init__(
        self,
        input_size: int,
        tdnn_channels=(512, 512, 512, 512, 1500),
        kernel_sizes=(5, 3, 3, 1, 1),
        dilations=(1, 2, 3, 1, 1),
        embedding_dim: int = 512,
        batch_norm: bool = True,
    ):
        super().__init__()
        self.projector = nn.Linear(input_size, tdnn_channels[0])
        in_channels = [tdnn_channels[0], *tdnn_channels[:-1]]
        self.tdnn = nn.ModuleList(
            nn.Conv1d(i, o, k, dilation=d)
            for i, o, k, d in zip(in_channels, tdnn_channels, kernel_sizes, dilations, strict=True)
        )
        # BatchNorm after each TDNN layer, as in SpeechBrain's TDNN blocks: without it a head
        # trained from scratch learns much slower (docs/results.md "Before text-dependent
        # scoring").
        # In eval mode it is an affine map per channel, which an export folds into HF's layout.
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(o) if batch_norm else nn.Identity() for o in tdnn_channels
        )
        self.context = sum((k - 1) * d for k, d in zip(kernel_sizes, dilations, strict=True))
        self.embedding = nn.Linear(2 * tdnn_channels[-1], embedding_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, T, F]`` with relative ``lengths`` ``[B]`` -> embeddings ``[B, 1, D]``."""
        frames = x.shape[1]
        valid = (
            torch.full((x.shape[0],), frames, device=x.device)
            if lengths is None
            else torch.round(lengths * frames).long()
        )
        if frames <= self.context:  # shorter than the TDNN context: pad so one frame remains
            x = F.pad(x, (0, 0, 0, self.context + 1 - frames))
        h = self.projector(x).transpose(1, 2)
        for layer, norm in zip(self.tdnn, self.norms, strict=True):
            h = norm(F.relu(layer(h)))
        out_lengths = (valid - self.context).clamp(min=2, max=h.shape[2])
        return self.embedding(masked_mean_std(h.transpose(1, 2), out_lengths)).unsqueeze(1)


def weighted_layer_sum(layer_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Softmax(``layer_logits``)-weighted sum of stacked hidden states ``[L, B, T, H]``."""
    weights = F.softmax(layer_logits, dim=0).to(hidden.dtype)
    return torch.einsum("l,lbth->bth", weights, hidden)


def valid_frame_mask(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` True on the valid frames of ``x`` ``[B, T, ...]`` (relative ``lengths``)."""
    if lengths is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    valid = torch.round(lengths.to(x.device) * x.shape[1]).long().clamp(min=1)
    return torch.arange(x.shape[1], device=x.device)[None, :] < valid[:, None]


class MHFAHead(nn.Module):
    """Multi-head factorized attentive pooling (MHFA; Peng, Stafylakis et al., SLT 2022).

    The backend of the TdSV 2024 winning system. Values are one learnable weighting of WavLM's
    layers (the encoder's ``layer_weighting``: the ``frames`` this head is called with), keys
    another (this head's ``key_layer_logits`` over the stacked ``hidden`` states); both are
    compressed to ``compression_dim``; each of ``heads`` attention heads pools the compressed
    values over time with its own softmax weights (computed from the keys), and the per-head
    means, concatenated, are projected to the embedding. The softmax runs over each utterance's
    valid frames only, so a batched utterance gets the embedding it gets alone.
    Returns ``[B, 1, embedding_dim]`` like the other heads.
    """

    #: Called as ``head(frames, lengths, hidden)``: it needs the stacked hidden states.
    takes_hidden_states = True

    def __init__(
        self,
        input_size: int,
        num_states: int,
        compression_dim: int = 128,
        heads: int = 32,
        embedding_dim: int = 256,
    ):
        super().__init__()
        self.key_layer_logits = nn.Parameter(torch.zeros(num_states))
        self.compress_keys = nn.Linear(input_size, compression_dim)
        self.compress_values = nn.Linear(input_size, compression_dim)
        self.attention = nn.Linear(compression_dim, heads)
        self.embedding = nn.Linear(heads * compression_dim, embedding_dim)

    def forward(self, frames, lengths=None, hidden=None) -> torch.Tensor:
        """Embeddings ``[B, 1, D]`` of values ``frames`` ``[B, T, H]`` and ``hidden`` states.

        ``hidden``: ``[L, B, T, H]``, all of WavLM's; ``lengths``: relative, ``[B]``.
        """
        if hidden is None or hidden.shape[0] != self.key_layer_logits.numel():
            got = None if hidden is None else hidden.shape[0]
            raise ValueError(
                f"MHFA needs all {self.key_layer_logits.numel()} hidden states of WavLM, got {got}"
            )
        keys = self.compress_keys(weighted_layer_sum(self.key_layer_logits, hidden))
        values = self.compress_values(frames)
        logits = self.attention(keys).float()  # [B, T, heads]; softmax in fp32
        valid = valid_frame_mask(frames, lengths)[..., None]
        weights = logits.masked_fill(~valid, float("-inf")).softmax(dim=1).to(values.dtype)
        pooled = torch.einsum("bth,btd->bhd", weights, values)  # each head's mean value
        return self.embedding(pooled.flatten(1)).unsqueeze(1)


def head_takes_hidden_states(head: nn.Module) -> bool:
    """True for a head (bare or DDP-wrapped) that also reads the stacked hidden states (MHFA)."""
    return bool(getattr(getattr(head, "module", head), "takes_hidden_states", False))


def pooled_embedding(head: nn.Module, frames, lengths, hidden=None) -> torch.Tensor:
    """``head`` on the layer-weighted ``frames``; a head that takes them also gets ``hidden``."""
    if head_takes_hidden_states(head):
        return head(frames, lengths, hidden)
    return head(frames, lengths)


class CosineClassifier(nn.Module):
    """Logits ``scale * cos(embedding, class weight)`` ``[B, C]`` of embeddings ``[B, E]``."""

    def __init__(self, embedding_dim: int, n_classes: int, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale = scale

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits."""
        return self.scale * F.normalize(embedding, dim=-1) @ F.normalize(self.weight, dim=-1).T


#: ``phrase_pooling``: the phrase branch's pooling head.
PHRASE_POOLINGS = ("xvector", "mhfa")
#: ``phrase_classifier_type``: plain cross-entropy logits, or scaled cosines with a margin.
PHRASE_CLASSIFIERS = ("linear", "cosine")


class PhraseBranch(nn.Module):
    """Pass-phrase classifier on WavLM's hidden states ``[L, B, T, H]``.

    Phrase content and speaker identity peak in different WavLM layers, so the branch has its own
    softmax layer weights, then a small pooling head that gives a phrase embedding, and a
    classifier over the training phrases (plus "other" when free text is trained). The embedding
    also gives a content-similarity score for pass-phrases that are not training classes.

    ``pooling``: "xvector" (dilated convolutions for temporal context, mean and std over valid
    frames: ``channels``, ``kernel_sizes``, ``dilations``) or "mhfa" (``MHFAHead``: attention
    heads, ``heads``, ``compression_dim``, its keys from a second layer weighting).
    ``classifier``: "linear" (ReLU + linear layer, plain cross-entropy) or "cosine" (scaled cosine
    logits trained with an additive ``margin``, AM-Softmax): a margin makes each phrase a compact
    cluster, so a sentence the branch never heard lands between them instead of inside one (free
    text, the open set of wrong phrases). Either way the scores are the posteriors of the logits.
    """

    def __init__(
        self,
        num_states: int,
        input_size: int,
        n_phrases: int,
        channels=(128, 128, 128),
        kernel_sizes=(5, 3, 3),
        dilations=(1, 2, 3),
        embedding_dim: int = 128,
        pooling: str = "xvector",
        heads: int = 8,
        compression_dim: int = 64,
        classifier: str = "linear",
        scale: float = 30.0,
        margin: float = 0.0,
    ):
        super().__init__()
        # How it was built, so an export rebuilds it from the module itself (JSON values).
        self.config = {
            "num_states": num_states, "input_size": input_size, "n_phrases": n_phrases,
            "channels": list(channels), "kernel_sizes": list(kernel_sizes),
            "dilations": list(dilations), "embedding_dim": embedding_dim, "pooling": pooling,
            "heads": heads, "compression_dim": compression_dim, "classifier": classifier,
            "scale": scale, "margin": margin,
        }  # fmt: skip
        self.layer_logits = nn.Parameter(torch.zeros(num_states))
        if pooling == "xvector":
            self.head = XVectorHead(input_size, channels, kernel_sizes, dilations, embedding_dim)
        elif pooling == "mhfa":
            self.head = MHFAHead(input_size, num_states, compression_dim, heads, embedding_dim)
        else:
            raise ValueError(
                f"phrase branch pooling must be one of {PHRASE_POOLINGS}, not {pooling!r}"
            )
        if classifier == "linear":
            if margin:
                raise ValueError("a margin needs the cosine phrase classifier")
            self.classifier = nn.Sequential(nn.ReLU(), nn.Linear(embedding_dim, n_phrases))
        elif classifier == "cosine":
            self.classifier = CosineClassifier(embedding_dim, n_phrases, scale)
        else:
            raise ValueError(
                f"phrase classifier must be one of {PHRASE_CLASSIFIERS}, not {classifier!r}"
            )
        self.margin_logit = margin * scale  # 0 for the linear classifier (checked above)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor | None = None):
        """``(phrase embedding [B, E], phrase logits [B, P])`` of hidden states ``[L, B, T, H]``."""
        frames = weighted_layer_sum(self.layer_logits, hidden)
        embedding = pooled_embedding(self.head, frames, lengths, hidden).squeeze(1)
        return embedding, self.classifier(embedding)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss: cross-entropy, with the additive margin taken off the target's logit."""
        logits = logits.float()
        if self.margin_logit:
            logits = logits - self.margin_logit * F.one_hot(targets, logits.shape[-1])
        return F.cross_entropy(logits, targets)


def scoring_outputs(outputs: dict) -> dict:
    """What is kept per utterance for scoring, from the model's ``all_outputs``.

    The speaker embedding and, with a phrase branch, the phrase log-posteriors (fp32) and the
    phrase embedding.
    """
    kept = {"speaker": outputs["speaker"]}
    if "phrase_logits" in outputs:
        kept["phrase_logp"] = F.log_softmax(outputs["phrase_logits"].float(), dim=-1)
        kept["phrase_embedding"] = outputs["phrase_embedding"]
    return kept


def per_utterance(outputs: dict) -> dict:
    """A model's outputs as one flat fp32 vector per utterance: ``{name: [B, D]}``.

    (The speaker embedding comes as ``[B, 1, D]``, SpeechBrain's convention.)
    """
    return {name: value.reshape(value.shape[0], -1).float() for name, value in outputs.items()}


# ------------------------------------------------------------------------------------------------
# Padding-free batches. WavLM computes two statistics over time that padding would change: the
# waveform normalization (SpeechBrain's wrapper normalizes the padded row) and the GroupNorm of the
# first CNN layer (one group per channel, over all frames), so a padded utterance's embedding moves
# far from its own (tests/test_speaker_model.py compares SpeechBrain's features). Both statistics
# are taken over each utterance's valid part here; everything
# after is already exact (convolutions without padding keep valid frames apart from padded ones,
# HF's encoder zeroes padded frames before its positional convolution and masks attention), so a
# batched utterance gets the embedding it gets alone, and evaluation can run in batches.
# ------------------------------------------------------------------------------------------------
class MaskedGroupNorm(nn.GroupNorm):
    """Per-channel GroupNorm over the valid frames of each utterance (``valid_frames`` [B]).

    ``valid_frames`` is set only for the duration of one forward pass (``wavlm_features``), so
    its layer must not be recomputed in the backward pass (``mask_cnn_padding`` keeps it out of
    gradient checkpointing); without it, or with channels grouped, this is ``nn.GroupNorm``.
    Parameter names are GroupNorm's, so checkpoints and HF weights load unchanged.
    """

    valid_frames: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` ``[B, C, T]``."""
        if self.valid_frames is None or self.num_groups != self.num_channels:
            return super().forward(x)
        # Statistics in fp32, as autocast runs GroupNorm. Autocast must be off here, not only
        # the input cast: it would run the bmm below in fp16 / bf16, where the sum of squares
        # of a 20 s utterance overflows fp16 (NaN) and bf16 loses the variance's digits.
        with torch.autocast(x.device.type, enabled=False):
            return self._masked_norm(x.float())

    def _masked_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The normalization of fp32 ``x`` over its valid frames (autocast off)."""
        frames = torch.arange(x.shape[-1], device=x.device)
        mask = (frames[None, :] < self.valid_frames[:, None]).to(x.dtype)[:, :, None]  # [B,T,1]
        # This tensor is the largest of the model ([B, 512, samples / 5]), so the statistics are
        # masked sums as batched matrix products and the output is one fused multiply-add,
        # faster than the elementwise masked_mean_var form (tests/benchmarks/bench_cnn_norm.py).
        count = mask.sum(1, keepdim=True).clamp(min=1)
        mean = torch.bmm(x, mask) / count
        var = (torch.bmm(x * x, mask) / count - mean * mean).clamp(min=0)  # fp32, mean ~ 0
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight[None, :, None]
            shift = shift * self.weight[None, :, None] + self.bias[None, :, None]
        return torch.addcmul(shift, x, scale)


def mask_cnn_padding(model: WavLMModel) -> MaskedGroupNorm | None:
    """Swap the first CNN layer's GroupNorm for a ``MaskedGroupNorm`` (None if it has none).

    That layer is also taken out of gradient checkpointing (so call this after enabling it): a
    recomputation in the backward pass would run without this batch's lengths (tested: torch's
    checkpoint then fails with a recomputation mismatch). It keeps its activations instead.
    """
    layer = model.feature_extractor.conv_layers[0]
    layer.gradient_checkpointing = False
    norm = getattr(layer, "layer_norm", None)
    if type(norm) is nn.GroupNorm:
        masked = MaskedGroupNorm(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        masked.load_state_dict(norm.state_dict())
        for name, parameter in masked.named_parameters():  # keep a frozen CNN frozen
            parameter.requires_grad_(getattr(norm, name).requires_grad)
        layer.layer_norm = masked.to(norm.weight.device)
    return layer.layer_norm if isinstance(layer.layer_norm, MaskedGroupNorm) else None


def frame_lengths(model, wav_lens, num_samples: int, num_frames: int) -> torch.Tensor | None:
    """Relative lengths ``[B]`` of each utterance's valid frames, exact (the CNN's formula).

    Rounding the waveform's relative length to frames can count one padded frame as valid,
    and the pooling of the head would then average in a frame of padding.
    """
    if wav_lens is None:
        return None
    samples = torch.round(wav_lens * num_samples).long()
    return model._get_feat_extract_output_lengths(samples).to(wav_lens.dtype) / num_frames


def wavlm_features(model, wav, wav_lens, normalize_wav: bool, all_hiddens: bool) -> torch.Tensor:
    """WavLM hidden states (``[L, B, T, H]`` or last ``[B, T, H]``) that ignore padding.

    ``wav_lens`` are relative lengths (SpeechBrain's convention); None means no padding, and then
    torch's fused norms compute the same statistics faster than the masked CNN norm
    (``tests/benchmarks/bench_cnn_norm.py``).
    """
    if wav_lens is None:
        if normalize_wav:
            wav = F.layer_norm(wav, wav.shape[1:])
        out = model(wav, output_hidden_states=all_hiddens)
        return torch.stack(list(out.hidden_states)) if all_hiddens else out.last_hidden_state
    samples = torch.round(wav_lens.to(wav.device) * wav.shape[1]).long()
    valid = torch.arange(wav.shape[1], device=wav.device)[None, :] < samples[:, None]
    if normalize_wav:  # F.layer_norm of each unpadded waveform, padding left at zero
        mean, var = masked_mean_var(wav, valid, dim=1)
        wav = (wav - mean) * torch.rsqrt(var + 1e-5) * valid
    cnn_norm = mask_cnn_padding(model)
    if cnn_norm is not None:
        kernel, stride = model.config.conv_kernel[0], model.config.conv_stride[0]
        cnn_norm.valid_frames = torch.div(samples - kernel, stride, rounding_mode="floor") + 1
    try:
        out = model(wav, attention_mask=valid, output_hidden_states=all_hiddens)
    finally:
        if cnn_norm is not None:
            cnn_norm.valid_frames = None
    return torch.stack(list(out.hidden_states)) if all_hiddens else out.last_hidden_state


def hidden_state_count(config: WavLMConfig) -> int:
    """The hidden states WavLM returns: the CNN's projected output, then one per layer."""
    return config.num_hidden_layers + 1


class WavLMFromConfig(nn.Module):
    """WavLM built from its config dict: the encoder of an exported folder (no model files).

    It has the state names (``model.*``) and the outputs of the training recipe's
    ``WavLMEncoder`` (SpeechBrain's Hugging Face wrapper, which loads pretrained weights): both
    return ``wavlm_features``, so ``WavLMSpeakerEmbedder`` runs either.

    Arguments:
    ---------
    wavlm_config : dict
        ``WavLMConfig`` arguments (``config.to_diff_dict()`` of the trained model).
    normalize_wav : bool
        Normalize each waveform to zero mean and unit variance (as the feature extractor says).
    output_all_hiddens : bool
        Return all hidden states ``[L, B, T, H]`` (True) or the last one ``[B, T, H]``.

    """

    def __init__(self, wavlm_config: dict, normalize_wav=True, output_all_hiddens=True):
        super().__init__()
        self.model = WavLMModel(WavLMConfig(**wavlm_config))
        mask_cnn_padding(self.model)
        self.normalize_wav, self.output_all_hiddens = normalize_wav, output_all_hiddens
        self.num_states = hidden_state_count(self.model.config)

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of waveforms ``[B, T]`` (relative ``wav_lens``) that ignore padding."""
        return wavlm_features(
            self.model, wavs, wav_lens, self.normalize_wav, self.output_all_hiddens
        )


class WavLMSpeakerEmbedder(nn.Module):
    """Waveforms ``[B, T]`` -> speaker embeddings ``[B, 1, D]``: WavLM, layer weights, head.

    The one embedding model: training runs it (``recipes/train_speaker_embeddings.py``), final
    scoring and export load its checkpoint, and an exported folder runs it from this file.

    Arguments:
    ---------
    encoder : torch.nn.Module
        WavLM returning padding-free hidden states (``wavlm_features``), holding the HF model as
        ``encoder.model`` and counting its hidden states as ``encoder.num_states``: the recipe's
        ``WavLMEncoder`` or an export's ``WavLMFromConfig``.
        With ``encoder.output_all_hiddens`` the frames are a learnable softmax-weighted sum of
        all hidden states, else the last one.
    head : torch.nn.Module
        The speaker head, called as ``head(frames [B, T', H], relative_lengths [B])`` (and the
        stacked hidden states when it ``takes_hidden_states``, as MHFA does).
    phrase_branch : PhraseBranch, optional
        The pass-phrase classifier on the same WavLM pass; it needs all hidden states.

    """

    def __init__(self, encoder: nn.Module, head: nn.Module, phrase_branch: nn.Module | None = None):
        super().__init__()
        layer_weighting = bool(encoder.output_all_hiddens)
        if (phrase_branch is not None or head_takes_hidden_states(head)) and not layer_weighting:
            raise ValueError("the phrase branch and MHFA need all hidden states (layer_weighting)")
        self.encoder = encoder
        self.layer_logits = (
            nn.Parameter(torch.zeros(encoder.num_states)) if layer_weighting else None
        )
        self.head = head
        self.phrase_branch = phrase_branch

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None, all_outputs=False):
        """Speaker embeddings ``[B, 1, D]`` of waveforms ``[B, T]``, relative lengths ``[B]``.

        With ``all_outputs``, a dict: ``"speaker"`` and, with a phrase branch, its
        ``"phrase_embedding"`` ``[B, E]`` and ``"phrase_logits"`` ``[B, P]``, from one WavLM
        pass (training calls it so, through ``forward``, so that DDP sees every parameter).
        """
        hidden = self.encoder(wavs, wav_lens)
        frames = hidden
        if self.layer_logits is not None:
            frames = weighted_layer_sum(self.layer_logits, hidden)
        lengths = frame_lengths(self.encoder.model, wav_lens, wavs.shape[1], frames.shape[1])
        speaker = pooled_embedding(self.head, frames, lengths, hidden)
        if not all_outputs:
            return speaker
        outputs = {"speaker": speaker}
        if self.phrase_branch is not None:
            embedding, logits = self.phrase_branch(hidden, lengths)
            outputs.update(phrase_embedding=embedding, phrase_logits=logits)
        return outputs

    def embed_all(self, wavs, wav_lens=None) -> dict:
        """What is scored per utterance (``scoring_outputs``), from one WavLM pass."""
        return scoring_outputs(self(wavs, wav_lens, all_outputs=True))

    def layer_weights(self) -> list[float]:
        """The current softmax layer weights of the speaker frames (for logging)."""
        if self.layer_logits is None:
            return []
        return F.softmax(self.layer_logits.detach().float(), dim=0).tolist()


# ------------------------------------------------------------------------------------------------
# Text-dependent decisions: a trial is a target only when the enrolled speaker says the enrolled
# pass-phrase. ``recipes/evaluation/fusion.py`` learns, on the dev trials, affine maps from named
# trial features (``TRIAL_FEATURES``) to calibrated log-likelihood ratios (``CALIBRATIONS``); they
# are applied here, with numbers only, so that an exported folder needs no scikit-learn and no
# repository.
# ------------------------------------------------------------------------------------------------
#: The phrase class of free-text training utterances (``include_free_text``).
OTHER_PHRASE = "other"
#: How fused decisions are made: "llr" (calibrated fusion), "gate" (speaker LLR, hard phrase
#: reject); the ``fusion`` setting is one of these or "none" (speaker scores, no fusion).
DECISION_KINDS = ("llr", "gate")
#: What ``fused_llr`` computes: a decision kind, or "speaker" (the speaker score calibrated alone).
FUSION_KINDS = (*DECISION_KINDS, "speaker")
#: The scores of a trial a fusion weights, by name, in the order reports list them: "speaker",
#: the cosine of enrollment model and test (score-normalized if configured); "phrase", the phrase
#: branch's log-posterior of the enrolled phrase (``phrase_feature``); "content", the cosine of
#: the enrollment's and the test's phrase embeddings.
TRIAL_FEATURES = ("speaker", "phrase", "content")
#: The affine calibrations a fusion learns and the features each weights: "phrase" for trials whose
#: enrolled phrase is a class of the phrase classifier, "content" for the others (a user's own
#: pass-phrase), "speaker" the speaker score alone (the gate, the reason of a reject). A new feature
#: is named in ``TRIAL_FEATURES`` and here, and computed where trials are scored
#: (``recipes.evaluation.fusion.trial_scores``; ``TDSVSpeakerRecognition.trial_features`` for one
#: trial): learning, applying, the stored fusion and the reports follow the names.
CALIBRATIONS = {
    "phrase": ("speaker", "phrase", "content"),
    "content": ("speaker", "content"),
    "speaker": ("speaker",),
}
#: Quality measures a fusion may also weight (``fusion_quality``), each a pair of trial features:
#: "duration", the log seconds of the test and of the whole enrollment (as scored: capped at
#: ``max_eval_seconds``); "cohort", the mean of the test's and of the enrollment model's top-k
#: cosines against the training speakers (``cohort_top_k``): how crowded its neighbourhood is.
#: Calibration of short pass-phrase trials depends on both (docs/design.md section 6). A new one
#: is named here and computed in ``recipes.evaluation.fusion.quality_scores`` and
#: ``TDSVSpeakerRecognition.trial_features``.
QUALITY_MEASURES = {
    "duration": ("log_test_duration", "log_enrol_duration"),
    "cohort": ("test_cohort_mean", "model_cohort_mean"),
}
#: The measures both training YAMLs weight (``fusion_quality``), chosen by the measurement in
#: docs/design.md section 6; reports of other measures are tagged (``verification.quality_tag``).
DEFAULT_QUALITY = ("cohort",)


def unit_rows(x) -> np.ndarray:
    """Rows scaled to unit length (float64; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def top_cohort_cosines(vectors, cohort, top_k: int | None) -> np.ndarray:
    """Each row's cosines against the cohort's rows, only its ``top_k`` highest (None: all).

    The cohort measure's input here and in an exported folder, and AS-norm's in the recipe.
    """
    scores = unit_rows(vectors) @ unit_rows(cohort).T
    if top_k is not None and top_k < scores.shape[1]:
        scores = -np.partition(-scores, top_k - 1, axis=1)[:, :top_k]
    return scores


def quality_features(quality) -> tuple[str, ...]:
    """The trial features of the quality measures ``quality`` (names of ``QUALITY_MEASURES``)."""
    unknown = [name for name in quality if name not in QUALITY_MEASURES]
    if unknown:
        raise ValueError(f"fusion_quality: {unknown} not in {', '.join(QUALITY_MEASURES)}")
    return tuple(feature for name in quality for feature in QUALITY_MEASURES[name])


def calibrations_with(quality) -> dict[str, tuple[str, ...]]:
    """``CALIBRATIONS``, each also weighting the features of the quality measures ``quality``."""
    extra = quality_features(quality)
    return {name: (*features, *extra) for name, features in CALIBRATIONS.items()}


#: The feature the phrase gate thresholds in each calibration's trials (fusion "gate").
GATE_FEATURES = {"phrase": "phrase", "content": "content"}
#: Subtracted from the speaker LLR of a trial that the phrase gate rejects (fusion "gate").
GATE_PENALTY = 100.0
#: Phrase log-posteriors are floored here: a target whose phrase the classifier misses should
#: cost a bounded amount of evidence, not an unbounded one (calibration, Cllr).
LOGP_FLOOR = -20.0
#: Operating points of the dev-calibrated thresholds (``export_operating_point``).
OPERATING_POINTS = ("eer", "min_dcf")
#: SdSV / TdSV detection costs: the default operating point of Bayes decisions. This constant and
#: ``bayes_threshold`` are twins of ``recipes.evaluation.metrics.SDSV_DCF`` / ``bayes_threshold``,
#: on purpose: this file is copied into exported folders and must not import the repository.
SDSV_COSTS = {"p_target": 0.01, "c_miss": 10.0, "c_fa": 1.0}


def bayes_threshold(p_target: float, c_miss: float, c_fa: float) -> float:
    """The LLR threshold of minimum expected cost: log(C_fa (1 - P) / (C_miss P))."""
    return math.log(c_fa * (1 - p_target) / (c_miss * p_target))


def phrase_feature(logp, known, content) -> np.ndarray:
    """The "phrase" feature: the floored log-posterior where ``known``, else ``content``.

    ``known[i]``: trial i's enrolled pass-phrase is a class of the phrase classifier; where it is
    not, the phrase score *is* the content similarity (and the "content" calibration applies).
    """
    known = np.asarray(known, bool)
    logp = np.maximum(np.asarray(logp, dtype=np.float64), LOGP_FLOOR)
    return np.where(known, logp, np.asarray(content, dtype=np.float64))


def calibrated(calibration: dict, features) -> np.ndarray:
    """An affine calibration (``{"features", "weights", "bias"}``) of named trial features."""
    weighted = [
        w * np.asarray(features[name], dtype=np.float64)
        for name, w in zip(calibration["features"], calibration["weights"], strict=True)
    ]
    return calibration["bias"] + np.sum(weighted, axis=0)


def fused_llr(fusion: dict, features, known=None, kind=None) -> np.ndarray:
    """Calibrated LLRs of trials from their named ``features`` (``TRIAL_FEATURES``).

    ``known[i]`` (default: all) says that trial i's enrolled pass-phrase is a class of the phrase
    classifier: the "phrase" calibration applies, else the "content" one (``CALIBRATIONS``).
    ``kind`` (default ``fusion["kind"]``): "llr", "gate" or "speaker" (the speaker score alone,
    calibrated).
    """
    kind = kind or fusion["kind"]
    if kind not in FUSION_KINDS:
        raise ValueError(f"fusion kind must be one of {FUSION_KINDS}, not {kind!r}")
    speaker = calibrated(fusion["speaker"], features)
    if kind == "speaker":
        return speaker
    known = np.ones(speaker.shape, bool) if known is None else np.asarray(known, bool)
    if kind == "llr":
        return np.where(
            known, calibrated(fusion["phrase"], features), calibrated(fusion["content"], features)
        )
    gate = fusion["gate_threshold"]
    gated = np.where(known, features[GATE_FEATURES["phrase"]], features[GATE_FEATURES["content"]])
    below = gated < np.where(known, gate["phrase"], gate["content"])
    return speaker - GATE_PENALTY * below


class Verdict(NamedTuple):
    """The outcome of one text-dependent trial (``TDSVSpeakerRecognition.verify_trial``)."""

    speaker_score: float  # cosine of enrollment model and test embedding
    phrase_score: float | None  # the "phrase" feature: floored log-posterior, or content similarity
    content_score: float | None  # content similarity of enrollment and test (phrase embeddings)
    score: float  # what the decision thresholds: the fused LLR, or the cosine without a fusion
    threshold: float | None
    accept: bool | None  # None: no threshold given or calibrated
    reason: str  # why a trial was rejected: "wrong pass-phrase", "speaker", or ""
    phrase: str | None  # the enrolled pass-phrase the test was checked against ("custom": none)


class AudioRefused(ValueError):
    """An audio file (named in the message) that cannot be scored: never a score, never accepted."""


def audio_refusal(wav: torch.Tensor, sample_rate: int, min_seconds: float) -> str | None:
    """Why a mono waveform cannot be scored (too short, non-finite, no signal), or None.

    The same checks, levels and wording as ``data_prep/audio_checks.py`` (tested to agree); a
    twin on purpose: an exported folder carries this file alone.
    """
    if wav.numel() < min_seconds * sample_rate:
        return f"too short ({wav.numel() / sample_rate:.3f} s, minimum {min_seconds} s)"
    finite = torch.isfinite(wav)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0])
        return (
            f"{int((~finite).sum())} non-finite sample(s) (NaN or inf), the first at "
            f"{first / sample_rate:.3f} s"
        )
    frame = max(1, int(0.025 * sample_rate))
    frames = wav[: wav.numel() // frame * frame].double().reshape(-1, frame)
    power = float((frames - frames.mean(1, keepdim=True)).pow(2).mean(1).max())
    loudest = 10 * math.log10(max(power, 1e-20))
    if loudest < -60:
        return (
            f"no speech energy (silence): the loudest 25 ms frame is at {loudest:.0f} dBFS, "
            "below -60 dBFS"
        )
    return None


class TDSVSpeakerRecognition(SpeakerRecognition):
    """Speaker verification with a trained TDSV model (``SpeakerRecognition``'s methods).

    Differences from SpeechBrain's class, each on purpose:

    - ``encode_batch`` embeds every utterance at its own length: our WavLM features ignore
      padding, but an ECAPA head's padded convolutions and a Hugging Face x-vector model do not,
      so this keeps every kind of model exact.
    - Decisions use the thresholds calibrated on the dev trials (``hparams.thresholds``, by
      operating point and number of enrollment utterances), not a fixed 0.25; a trial is accepted
      when ``score >= threshold``.
    - ``verify_enrolment`` scores a test file against several enrollment files (the mean of
      their L2-normalized embeddings, as the verification recipe does).
    - ``load_audio`` reads any sample rate and channel count, and logs when it resamples or
      down-mixes.
    - With a phrase branch and a fusion (``hparams.fusion``), ``verify_trial`` also checks the
      pass-phrase and decides on the calibrated LLR at the Bayes threshold of the costs
      (``hparams.costs``, SdSV by default), saying "wrong pass-phrase" when that is the reason
      for a reject; ``verify_enrolment`` / ``verify_files`` then return the LLR as the score.
    """

    MODULES_NEEDED: ClassVar[list[str]] = ["embedding_model"]

    def encode_batch(self, wavs, wav_lens=None, normalize=False):
        """Embeddings ``[B, 1, D]`` of waveforms ``[B, T]`` (L2-normalized if ``normalize``)."""
        wavs = (wavs.unsqueeze(0) if wavs.dim() == 1 else wavs).to(self.device).float()
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0])
        embeddings = []
        with torch.no_grad(), self.inference_ctx:
            for wav, rel in zip(wavs, wav_lens.tolist(), strict=True):
                samples = max(1, round(rel * wavs.shape[1]))
                embeddings.append(self.mods.embedding_model(wav[None, :samples]).float())
        embeddings = torch.cat(embeddings)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def threshold(self, n_enrol: int = 1, operating_point: str | None = None) -> float | None:
        """The dev-calibrated threshold for ``n_enrol`` enrollment utterances (None: uncalibrated).

        ``operating_point`` is "eer" or "min_dcf" (default: ``hparams.operating_point``). For more
        enrollment utterances than were calibrated, the largest calibrated count is used.
        """
        count = self.calibrated_count(n_enrol, operating_point)
        if count is None:
            return None
        point = operating_point or self.hparams.operating_point
        return float(self.hparams.thresholds[point][str(count)])

    def calibrated_count(self, n_enrol: int, operating_point: str | None = None) -> int | None:
        """The enrollment count whose threshold ``threshold(n_enrol)`` uses (None: uncalibrated)."""
        table = getattr(self.hparams, "thresholds", None)
        if not table:
            return None
        point = operating_point or self.hparams.operating_point
        if point not in table:
            raise ValueError(f"operating point {point!r}: the model has {sorted(table)}")
        counts = sorted(int(n) for n in table[point])
        return max([n for n in counts if n <= n_enrol] or counts[:1])

    def verify_batch(self, wavs1, wavs2, wav1_lens=None, wav2_lens=None, threshold=None):
        """Cosine scores ``[B, 1]`` of pairs and decisions (None without any threshold)."""
        emb1 = self.encode_batch(wavs1, wav1_lens)
        emb2 = self.encode_batch(wavs2, wav2_lens)
        score = self.similarity(emb1, emb2)
        return score, self.decide(score, n_enrol=1, threshold=threshold)

    def verify_files(self, path_x, path_y, threshold=None, **kwargs):
        """Score and decision for two audio files (one enrollment utterance)."""
        return self.verify_enrolment([path_x], path_y, threshold)

    def embed_file(self, path) -> torch.Tensor:
        """The embedding ``[D]`` of one audio file."""
        return self.encode_batch(self.load_audio(path))[0, 0]

    def enrol(self, paths) -> torch.Tensor:
        """Enrollment model ``[D]`` of audio files (see ``enrolment_model``)."""
        if not paths:
            raise ValueError("enrollment needs at least one audio file")
        return self.enrolment_model(torch.stack([self.embed_file(path) for path in paths]))

    @staticmethod
    def enrolment_model(embeddings: torch.Tensor) -> torch.Tensor:
        """Unit vector ``[D]``: the mean of the L2-normalized embeddings ``[N, D]``."""
        return F.normalize(F.normalize(embeddings, dim=-1).mean(0), dim=-1)

    def verify_enrolment(self, enrol_paths, test_path, threshold=None):
        """Score (a 0-d tensor) and decision for a test file against several enrollment files.

        The score is the fused LLR when the model has a fusion, else the cosine.
        """
        verdict = self.verify_trial(enrol_paths, test_path, threshold=threshold)
        return torch.tensor(verdict.score), verdict.accept

    # -------------------------------------------------------------------- text-dependent trials
    def has_fusion(self) -> bool:
        """True when the model checks the pass-phrase and fuses (phrase branch + fusion)."""
        branch = getattr(self.mods.embedding_model, "phrase_branch", None)
        return branch is not None and bool(getattr(self.hparams, "fusion", None))

    def embed_file_all(self, path) -> dict:
        """Speaker embedding ``[D]`` and, with a phrase branch, phrase log-posteriors/embedding."""
        return self.embed_waveform(self.load_audio(path))

    def embed_waveform(self, wav: torch.Tensor) -> dict:
        """The model's outputs ``{name: [D]}`` for one unpadded waveform ``[T]``.

        Also ``"seconds"``: its duration, which the quality measure "duration" reads.
        """
        model = self.mods.embedding_model
        if not hasattr(model, "embed_all"):  # e.g. a Hugging Face x-vector model
            return {"speaker": self.encode_batch(wav[None])[0, 0]}
        with torch.no_grad(), self.inference_ctx:
            outputs = model.embed_all(wav[None].to(self.device).float())
        outputs = {name: vectors[0] for name, vectors in per_utterance(outputs).items()}
        seconds = wav.shape[-1] / self.audio_normalizer.sample_rate  # a quality measure's input
        return {**outputs, "seconds": torch.tensor(seconds, dtype=torch.float64)}

    def enrolled_phrase(self, enrol_outputs: list[dict], phrase: str | None = None) -> str:
        """The pass-phrase label to check, or "custom" (content similarity) when it is no class.

        Without ``phrase``, the class with the highest mean posterior over the enrollment
        utterances, when that posterior is at least 0.5 and the class is not "other".
        """
        labels = list(self.hparams.phrase_labels)
        if phrase is not None:
            return self.checked_phrase(phrase)
        recognized = [labels[int(o["phrase_logp"].argmax())] for o in enrol_outputs]
        if len(set(recognized)) > 1:
            raise ValueError(
                f"the enrollment files were recognized as different pass-phrases "
                f"({', '.join(recognized)}): enroll one pass-phrase, or name it (--phrase ID, "
                "or custom for a phrase the model was not trained on)"
            )
        posterior = torch.stack([o["phrase_logp"] for o in enrol_outputs]).exp().mean(0)
        best = int(posterior.argmax())
        if posterior[best] < 0.5 or labels[best] == OTHER_PHRASE:
            return "custom"
        return labels[best]

    def checked_phrase(self, phrase: str) -> str:
        """``phrase`` if it is a pass-phrase of the model or "custom"; else a ValueError.

        An unknown id is refused, not scored as "custom": ``6`` for ``06`` would otherwise
        switch silently to content similarity.
        """
        known = [label for label in self.hparams.phrase_labels if label != OTHER_PHRASE]
        if phrase == "custom" or phrase in known:
            return phrase
        hint = next((f"; did you mean {k!r}?" for k in known if k.lstrip("0") == phrase), "")
        raise ValueError(
            f"phrase {phrase!r} is not a pass-phrase of this model ({', '.join(known)}; or "
            f"custom, for a phrase it was not trained on){hint}"
        )

    def phrase_score(self, test_outputs, phrase: str, content: float) -> float:
        """Log-posterior of ``phrase`` for the test, or the ``content`` similarity for "custom"."""
        if phrase == "custom":
            return content
        index = list(self.hparams.phrase_labels).index(phrase)
        return float(test_outputs["phrase_logp"][index])

    def content_score(self, enrol_outputs, test_outputs) -> float:
        """Cosine of the enrollment's mean phrase embedding and the test's."""
        model = self.enrolment_model(torch.stack([o["phrase_embedding"] for o in enrol_outputs]))
        return float(F.cosine_similarity(model, test_outputs["phrase_embedding"], dim=0))

    def trial_features(self, enrol_outputs, test_outputs, phrase: str | None) -> dict:
        """The named features (``TRIAL_FEATURES``) of one trial: ``{"speaker": cosine, ...}``.

        With an enrolled ``phrase`` (a class label, or "custom"), also "phrase" and "content";
        and the features of the quality measures the fusion weights (``QUALITY_MEASURES``; the
        cohort is the folder's training speakers, ``hparams.cohort``).
        """
        model = self.enrolment_model(torch.stack([o["speaker"] for o in enrol_outputs]))
        features = {"speaker": float(F.cosine_similarity(model, test_outputs["speaker"], dim=0))}
        if phrase is not None:
            content = self.content_score(enrol_outputs, test_outputs)
            logp = self.phrase_score(test_outputs, phrase, content)
            features["phrase"] = float(phrase_feature([logp], [phrase != "custom"], [content])[0])
            features["content"] = content
        quality = (getattr(self.hparams, "fusion", None) or {}).get("quality", [])
        if "duration" in quality:
            features["log_test_duration"] = math.log(float(test_outputs["seconds"]))
            enrol = sum(float(o["seconds"]) for o in enrol_outputs)
            features["log_enrol_duration"] = math.log(enrol)
        if "cohort" in quality:  # the folder's training speakers (cohort.ckpt)
            cohort = self.hparams.cohort.weight.detach().cpu().numpy()
            vectors = torch.stack([model, test_outputs["speaker"]]).detach().cpu().numpy()
            means = top_cohort_cosines(vectors, cohort, self.hparams.cohort_top_k).mean(axis=1)
            features["model_cohort_mean"], features["test_cohort_mean"] = map(float, means)
        return features

    def score_trial(self, enrol_outputs, test_outputs, phrase=None, threshold=None, costs=None):
        """A ``Verdict`` from embedded enrollment files and an embedded test file.

        ``costs`` (``p_target``, ``c_miss``, ``c_fa``) set the Bayes threshold of the LLR
        (default ``hparams.costs``); ``threshold`` overrides it.
        """
        n_enrol = len(enrol_outputs)
        if not self.has_fusion():
            speaker = self.trial_features(enrol_outputs, test_outputs, None)["speaker"]
            threshold = self.threshold(n_enrol) if threshold is None else threshold
            accept = self.decide(speaker, n_enrol, threshold)
            reason = "" if accept or accept is None else "speaker"
            return Verdict(speaker, None, None, speaker, threshold, accept, reason, None)
        phrase = self.enrolled_phrase(enrol_outputs, phrase)
        features = self.trial_features(enrol_outputs, test_outputs, phrase)
        fusion = self.hparams.fusion
        llr = float(fused_llr(fusion, features, known=phrase != "custom"))
        if threshold is None:
            chosen = {**SDSV_COSTS, **(getattr(self.hparams, "costs", None) or {}), **(costs or {})}
            threshold = bayes_threshold(**chosen)
        accept = llr >= threshold
        reason = ""
        if not accept:
            speaker_llr = float(fused_llr(fusion, features, kind="speaker"))
            reason = "wrong pass-phrase" if speaker_llr >= threshold else "speaker"
        scores = [features[name] for name in TRIAL_FEATURES]
        return Verdict(*scores, llr, threshold, accept, reason, phrase)

    def verify_trial(self, enrol_paths, test_path, phrase=None, threshold=None, costs=None):
        """A ``Verdict`` for a test file against enrollment files (see ``score_trial``)."""
        if not enrol_paths:
            raise ValueError("enrollment needs at least one audio file")
        enrol = [self.embed_file_all(path) for path in enrol_paths]
        return self.score_trial(enrol, self.embed_file_all(test_path), phrase, threshold, costs)

    def decide(self, score, n_enrol: int, threshold=None):
        """``score >= threshold`` (None when no threshold is given or calibrated).

        The calibrated threshold for ``n_enrol`` enrollment utterances unless one is given.
        """
        threshold = self.threshold(n_enrol) if threshold is None else threshold
        return None if threshold is None else score >= threshold

    def load_audio(self, path, savedir=None):
        """A mono waveform at the model's sample rate from an audio file of any rate / channels."""
        try:
            signal, rate = audio_io.load(str(path), channels_first=False)
        except Exception as error:  # soundfile's messages do not always name the file
            raise RuntimeError(f"cannot read audio {path}: {error}") from error
        if signal.shape[0] == 0:
            raise ValueError(f"{path}: the audio file has no samples")
        target = self.audio_normalizer.sample_rate
        changes = [f"resampled {rate} -> {target} Hz"] if rate != target else []
        if signal.dim() > 1 and signal.shape[1] > 1:
            changes.append(f"down-mixed {signal.shape[1]} channels to mono")
        wav = self.audio_normalizer(signal, rate)
        limit = getattr(self.hparams, "max_eval_seconds", None)
        if limit and wav.shape[0] > limit * target:
            changes.append(
                f"cut from {wav.shape[0] / target:.1f} s to {limit} s (max_eval_seconds)"
            )
            wav = wav[: int(limit * target)]
        if changes:
            logger.warning("%s: %s", path, ", ".join(changes))
        refusal = audio_refusal(wav, target, getattr(self.hparams, "min_audio_seconds", 0.3))
        if refusal:
            raise AudioRefused(f"{path}: {refusal}")
        return wav.to(self.device)
