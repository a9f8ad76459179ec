"""The speaker embedding model as used after training, and its SpeechBrain inference interface.

- ``XVectorHead``: projector + TDNN stack + statistics pooling + embedding, laid out exactly like
  the head of ``transformers.WavLMForXVector`` so that weights can be exchanged with it.
- ``PhraseBranch``: the pass-phrase classifier on the same WavLM forward pass (its own layer
  weights and pooling head), for text-dependent scoring.
- ``WavLMSpeakerEmbedder``: WavLM, weighted layer sum, a speaker head and optionally the phrase
  branch: the one model that training runs, scoring loads and an exported folder ships (there
  with ``WavLMFromConfig``, WavLM built from its config instead of loaded from model files).
- ``TDSVSpeakerRecognition``: SpeechBrain's ``SpeakerRecognition`` interface with embeddings
  computed one utterance at a time, several enrollment utterances, thresholds calibrated on the
  validation trials (or Bayes decisions on fused LLRs, with the reason of a reject), and audio of
  any sample rate or channel count. Its decisions (trial features, fused LLRs, verdicts) are
  ``trial_decisions.py``'s, shared with the torch-free ONNX backend.

This file imports only torch, SpeechBrain, transformers and ``trial_decisions.py``:
``recipes/export_model.py`` writes it into every exported model folder as
``tdsv_speaker_model.py``, with ``trial_decisions.py``'s code in place of that import
(``pretrained.exported_source``): one self-contained file, which SpeechBrain's ``foreign_class``
fetches (into a ``savedir``, from a folder or the Hugging Face hub) and loads without this
repository.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import partial
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from speechbrain.dataio import audio_io
from speechbrain.inference.speaker import SpeakerRecognition
from speechbrain.utils.checkpoints import mark_as_loader, register_checkpoint_hooks
from torch import nn
from transformers import WavLMConfig, WavLMModel

# An exported folder's copy holds trial_decisions.py's code here instead (export_model.py).
from recipes.model.trial_decisions import (
    TrialDecisions,
    enrolment_model,
    read_cohort,
    scorable_waveform,
    vectors,
)

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

    projector (Linear) -> TDNN layers (dilated Conv1d + ReLU + BatchNorm, no padding) ->
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
    ):
        super().__init__()
        self.projector = nn.Linear(input_size, tdnn_channels[0])
        in_channels = [tdnn_channels[0], *tdnn_channels[:-1]]
        self.tdnn = nn.ModuleList(
            nn.Conv1d(i, o, k, dilation=d)
            for i, o, k, d in zip(in_channels, tdnn_channels, kernel_sizes, dilations, strict=True)
        )
        # BatchNorm after each TDNN layer, as in SpeechBrain's TDNN blocks: without it (HF's
        # WavLMForXVector layout) the head trained from scratch learned much slower. In eval mode
        # it is an affine map per channel, which an export folds into HF's layout.
        self.norms = nn.ModuleList(nn.BatchNorm1d(o) for o in tdnn_channels)
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
        # Shorter than the TDNN context: pad so that one frame remains. sym_max, not an if: the
        # ONNX graph (torch.export) must keep both cases for its dynamic length.
        x = F.pad(x, (0, 0, 0, torch.sym_max(0, self.context + 1 - frames)))
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

    The backend of the published TdSV 2024 WavLM Base+ MHFA system (SpeechPublications/tdsv2024).
    Values are one learnable weighting of WavLM's layers (the encoder's ``layer_weighting``: the
    ``frames`` this head is called with), keys another (this head's ``key_layer_logits`` over the
    stacked ``hidden`` states); both are compressed to ``compression_dim``; each of ``heads``
    attention heads pools the compressed values over time with its own softmax weights (computed
    from the keys), and the per-head means, concatenated, are projected to the embedding. The
    softmax runs over each utterance's valid frames only, so a batched utterance gets the embedding
    it gets alone.
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


class PhraseBranch(nn.Module):
    """Pass-phrase classifier on WavLM's hidden states ``[L, B, T, H]``.

    Phrase content and speaker identity peak in different WavLM layers, so the branch has its own
    softmax layer weights, then a small x-vector head (dilated convolutions for temporal context,
    mean and std over valid frames: ``channels``, ``kernel_sizes``, ``dilations``) that gives a
    phrase embedding, and a classifier over the training phrases (plus "other" when free text is
    trained). The embedding also gives a content-similarity score for pass-phrases that are not
    training classes.

    The classifier gives scaled cosine logits trained with an additive ``margin`` (AM-Softmax): a
    margin makes each phrase a compact cluster, so a sentence the branch never heard lands between
    them instead of inside one (free text, the open set of wrong phrases; docs/results.md
    "Text-dependent scoring" measured it against a plain linear classifier). The scores are the
    posteriors of the logits.
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
        scale: float = 30.0,
        margin: float = 0.0,
    ):
        super().__init__()
        # How it was built, so an export rebuilds it from the module itself (JSON values).
        self.config = {
            "num_states": num_states, "input_size": input_size, "n_phrases": n_phrases,
            "channels": list(channels), "kernel_sizes": list(kernel_sizes),
            "dilations": list(dilations), "embedding_dim": embedding_dim, "scale": scale,
            "margin": margin,
        }  # fmt: skip
        self.layer_logits = nn.Parameter(torch.zeros(num_states))
        self.head = XVectorHead(input_size, channels, kernel_sizes, dilations, embedding_dim)
        self.classifier = CosineClassifier(embedding_dim, n_phrases, scale)
        self.margin_logit = margin * scale

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
@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 matrix products and convolutions as IEEE fp32, TF32 off, for the block's duration.

    ``import speechbrain`` allows TF32 (10-bit mantissas) for both on Ampere and later GPUs:
    "fp32" there is not the CPU's fp32. The masked GroupNorm's statistics and the export's
    measurements use this. (SpeechBrain's own switch, the legacy flags, is the one set here:
    torch refuses the two APIs mixed.) Also a decorator: ``@strict_fp32()``.
    """
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    previous = [flag.allow_tf32 for flag in flags]
    for flag in flags:
        flag.allow_tf32 = False
    try:
        yield
    finally:
        for flag, allowed in zip(flags, previous, strict=True):
            flag.allow_tf32 = allowed


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
        # the input cast: it would run the products below in fp16 / bf16, where a 20 s
        # utterance's variance overflows fp16 (NaN) or loses its digits in bf16. TF32 must be
        # off too (SpeechBrain turns it on): it rounds the products' inputs to 10 bits.
        with torch.autocast(x.device.type, enabled=False), strict_fp32():
            return self._masked_norm(x.float())

    def _masked_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The normalization of fp32 ``x`` over its valid frames (autocast off)."""
        frames = torch.arange(x.shape[-1], device=x.device)
        mask = (frames[None, :] < self.valid_frames[:, None]).to(x.dtype)[:, :, None]  # [B,T,1]
        # This tensor is the largest of the model ([B, 512, samples / 5]), so the statistics are
        # masked sums as batched matrix products (in IEEE fp32: ``forward``) and the output is one
        # fused multiply-add, faster than the elementwise masked_mean_var form, with no host sync
        # (tests/benchmarks/bench_cnn_norm.py).
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
        return model_states(model(wav, output_hidden_states=all_hiddens), all_hiddens)
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
    return model_states(out, all_hiddens)


def model_states(out, all_hiddens: bool) -> torch.Tensor:
    """WavLM's stacked hidden states ``[L, B, T, H]`` (or its last ``[B, T, H]``).

    The last state is the encoder's output, ``last_hidden_state``: for stable-layer-norm configs
    (WavLM Large) transformers 5 records each layer's output, before the encoder's final
    LayerNorm, which 4.x applied to the last state. Without it the head would see another
    representation under each version, and that LayerNorm would get no gradient (DDP without
    ``find_unused_parameters`` fails). For post-norm configs (Base+) the two are one tensor.
    """
    if not all_hiddens:
        return out.last_hidden_state
    return torch.stack([*out.hidden_states[:-1], out.last_hidden_state])


# ------------------------------------------------------------------------------------------------
# WavLM attention. transformers' WavLMAttention calls F.multi_head_attention_forward with
# need_weights=True: every layer materializes the softmax weights (and averages them over heads)
# in plain matmuls, never torch's fused scaled-dot-product kernels. "sdpa" computes the same
# attention with F.scaled_dot_product_attention, the gated relative position bias (and the
# padding) as its additive mask; tests/test_speaker_model.py checks parity (1e-5, fp32), and
# tests/benchmarks/bench_train.py and bench_backends.py time both (docs/performance.md).
# ------------------------------------------------------------------------------------------------
#: The ``wavlm_attention`` choices.
ATTENTION_KINDS = ("sdpa", "eager")


def sdpa_self_attention(attention, hidden_states, attention_mask, gated_position_bias):
    """``WavLMAttention.torch_multi_head_self_attention`` on ``F.scaled_dot_product_attention``.

    ``gated_position_bias`` is ``[B * heads, T, T]``; ``attention_mask`` ``[B, T]`` (1: valid).
    Returns ``(output [B, T, E], None)``: no attention weights (they are what SDPA saves).
    """
    batch, frames, width = hidden_states.shape
    heads = attention.num_heads

    def split_heads(projection):
        """``[B, T, E]`` -> ``[B, heads, T, head_dim]``."""
        return projection(hidden_states).view(batch, frames, heads, -1).transpose(1, 2)

    query, key, value = (
        split_heads(p) for p in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    mask = gated_position_bias.view(batch, heads, frames, frames)
    if attention_mask is not None:
        padded = ~attention_mask.bool()[:, None, None, :]
        mask = mask.masked_fill(padded, float("-inf"))
    output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask.to(query.dtype),
        dropout_p=attention.dropout if attention.training else 0.0,
    )
    return attention.out_proj(output.transpose(1, 2).reshape(batch, frames, width)), None


def use_attention(model: WavLMModel, kind: str) -> None:
    """Compute every attention layer of ``model`` the ``kind`` way (``ATTENTION_KINDS``)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"wavlm_attention must be one of {ATTENTION_KINDS}, not {kind!r}")
    for layer in model.encoder.layers:
        attention = layer.attention
        if kind == "sdpa":
            attention.torch_multi_head_self_attention = partial(sdpa_self_attention, attention)
        else:  # the class's own method again
            attention.__dict__.pop("torch_multi_head_self_attention", None)


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
    attention : str
        How attention is computed (``ATTENTION_KINDS``), as the run trained it.

    """

    def __init__(
        self, wavlm_config: dict, normalize_wav=True, output_all_hiddens=True, attention="eager"
    ):
        super().__init__()
        self.model = WavLMModel(WavLMConfig(**wavlm_config))
        mask_cnn_padding(self.model)
        use_attention(self.model, attention)
        self.attention = attention
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


@register_checkpoint_hooks
class TrainingSpeakers:
    """The training speakers of the quality measure "cohort": their mean embeddings ``[S, D]``.

    An exported folder's ``cohort`` loadable: SpeechBrain's Pretrainer fetches its file
    (``trial_decisions.COHORT_FILE``, a NumPy array, read without pickle) as it fetches the
    model's weights, from a folder or the hub; the ONNX backend reads the same file.
    """

    def __init__(self):
        self.matrix = None

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        """Read the array (the Pretrainer's hook)."""
        del end_of_epoch  # the Pretrainer's signature; a cohort is not training state
        self.matrix = read_cohort(path)


class TDSVSpeakerRecognition(TrialDecisions, SpeakerRecognition):
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

    The decisions are ``TrialDecisions``' (``trial_decisions.py``), shared with the ONNX backend.
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
        embeddings = [self.embed_file(path).cpu() for path in paths]
        return torch.from_numpy(enrolment_model(vectors(embeddings))).float()

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

    def cohort_matrix(self) -> np.ndarray:
        """The training speakers of the quality measure "cohort" (``TrainingSpeakers``)."""
        return self.hparams.cohort.matrix

    def embed_waveform(self, wav: torch.Tensor) -> dict:
        """The model's outputs ``{name: [D]}`` (CPU tensors) for one unpadded waveform ``[T]``.

        Also ``"seconds"``: its duration, which the quality measure "duration" reads.
        """
        model = self.mods.embedding_model
        if not hasattr(model, "embed_all"):  # e.g. a Hugging Face x-vector model
            return {"speaker": self.encode_batch(wav[None])[0, 0].cpu()}
        with torch.no_grad(), self.inference_ctx:
            outputs = model.embed_all(wav[None].to(self.device).float())
        outputs = {name: rows[0].cpu() for name, rows in per_utterance(outputs).items()}
        seconds = wav.shape[-1] / self.audio_normalizer.sample_rate  # a quality measure's input
        return {**outputs, "seconds": torch.tensor(seconds, dtype=torch.float64)}

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
        wav = scorable_waveform(path, wav, target, self.hparams, changes)
        return wav.to(self.device)
