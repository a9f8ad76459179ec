"""Model pieces the YAML wires together, where SpeechBrain has no ready block.

- ``WavLMEncoder``: SpeechBrain's HF ``WavLM`` wrapper (any HF id or local directory) returning
  all hidden states, LayerDrop switched off (it returns fewer hidden states on random steps, which
  breaks a layer-weighted sum), optional gradient checkpointing, and features that do not depend
  on padding (``speaker_model.wavlm_features``), so utterances can be batched at evaluation. The
  encoder of ``speaker_model.WavLMSpeakerEmbedder``, which weights the layers.
- ``L2SP``: the squared distance of WavLM's weights from their pretrained values (L2-SP), a
  regularizer added to the loss when fine-tuning (as the published TdSV 2024 WavLM Base+ MHFA
  system fine-tuned).
- ``MarginSoftmax``: SpeechBrain's ``LogSoftmaxWrapper`` around ``AngularMargin`` (AM-Softmax) or
  ``AdditiveAngularMargin`` (AAM), with a fixed or AdaCos-style adaptive scale and an
  optional margin warm-up.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import constants, snapshot_download
from speechbrain.integrations.huggingface.wavlm import WavLM
from speechbrain.nnet.losses import AdditiveAngularMargin, AngularMargin, LogSoftmaxWrapper
from speechbrain.utils.distributed import run_once_per_node
from speechbrain.utils.logger import get_logger
from torch import nn

from recipes.model.speaker_model import (
    hidden_state_count,
    mask_cnn_padding,
    use_attention,
    wavlm_features,
)

logger = get_logger(__name__)


class WavLMEncoder(WavLM):
    """WavLM (any HF id or local directory) returning padding-free hidden states.

    Arguments:
    ---------
    source : str
        Hugging Face model id or local directory (with ``preprocessor_config.json``).
    save_path : str
        Cache directory for downloaded weights.
    freeze_feature_extractor : bool
        Freeze the CNN feature encoder (right for pretrained weights only).
    gradient_checkpointing : bool
        Recompute transformer activations in the backward pass (less memory, ~30 % more time).
    layer_weighting : bool
        Return all hidden states, for the model's weighted sum of them (True), or the last one.
    attention : str
        How attention is computed (``speaker_model.ATTENTION_KINDS``): "sdpa" or "eager"
        (transformers' own); the same numbers either way (``use_attention``).

    """

    def __init__(
        self,
        source,
        save_path,
        freeze_feature_extractor=True,
        gradient_checkpointing=False,
        layer_weighting=True,
        attention="eager",
        **kwargs,
    ):
        super().__init__(
            local_wavlm_source(source),
            save_path,
            freeze_feature_extractor=freeze_feature_extractor,
            output_all_hiddens=layer_weighting,
            **kwargs,
        )
        if self.output_norm:
            raise ValueError("output_norm is not supported (it would normalize over padding)")
        stored = {p.dtype for p in self.model.parameters()} - {torch.float32}
        if stored:  # transformers 5 loads with dtype="auto": a half checkpoint stays half
            logger.info("WavLM %s is stored in %s: its weights are trained in fp32", source, stored)
            self.model.float()  # mixed precision is autocast's job; GradScaler needs fp32 weights
        self.model.config.layerdrop = 0.0
        masked_spec_embed = getattr(self.model, "masked_spec_embed", None)
        if masked_spec_embed is not None and not self.model.config.apply_spec_augment:
            # Used only by SpecAugment, which SpeechBrain's wrapper switches off: a trainable
            # parameter outside the forward would break DDP (and L2-SP would still move it).
            masked_spec_embed.requires_grad_(False)
        if freeze_feature_extractor:
            # SpeechBrain only sets requires_grad=False on the CNN's parameters; HF then still
            # makes the waveform require grad, and autograd keeps the CNN's activations and
            # back-propagates through it for nothing. HF's own switch skips both.
            self.model.freeze_feature_encoder()
        if gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        mask_cnn_padding(self.model)  # after: it takes its layer out of checkpointing
        use_attention(self.model, attention)
        self.attention = attention
        self.output_size = self.model.config.hidden_size
        #: Hidden states WavLM returns (CNN output + one per layer): MHFA's key layer weights.
        self.num_states = hidden_state_count(self.model.config)

    def extract_features(self, wav, wav_lens=None):
        """Hidden states of WavLM that do not depend on padding (see ``wavlm_features``)."""
        return wavlm_features(
            self.model, wav, wav_lens, self.normalize_wav, self.output_all_hiddens
        )


def enable_activation_checkpointing(model) -> None:
    """Recompute ``model``'s layer activations in the backward pass (non-reentrant).

    Non-reentrant checkpointing works with DDP and with frozen inputs. transformers renamed the
    switch (``gradient_checkpointing_enable`` goes away in 6); the old name serves older 5.x / 4.x.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    else:
        enable({"use_reentrant": False})


def local_wavlm_source(source) -> str:
    """``source`` as a local model directory: itself, or a hub id's Hugging Face cache snapshot.

    A hub id is downloaded once into the standard Hugging Face cache (``HF_HOME`` /
    ``HF_HUB_CACHE``), shared by every run and output folder: by one process per machine while
    the others wait, then read from the cache by all. With ``HF_HUB_OFFLINE=1`` (or no network)
    it is read from the cache alone. SpeechBrain's wrapper would otherwise ask the hub for the
    file list on every start (no offline use) and keep a copy under each run's ``save_path``.
    """
    if Path(source).is_dir():
        return str(source)
    run_once_per_node(_download, args=[source])
    try:
        return _hub_snapshot(source, local_files_only=True)
    except Exception as error:  # huggingface_hub's errors do not say what was asked for
        raise FileNotFoundError(
            f"wavlm_source {source!r} is not a local directory and is not in the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}); download it once with network access, or set "
            f"wavlm_source to a local copy ({type(error).__name__}: {error})"
        ) from error


def _download(repo_id: str) -> None:
    """Bring ``repo_id`` into the Hugging Face cache; a failure is left to the cache lookup."""
    try:
        _hub_snapshot(repo_id)
    except Exception as error:  # no network: the cache may hold it (HF_HUB_OFFLINE or not)
        logger.warning("cannot download %s (%s): looking in the local cache", repo_id, error)


def _hub_snapshot(repo_id: str, local_files_only: bool = False) -> str:
    """The cache folder of ``repo_id``'s config, feature extractor and weights (one format)."""
    kwargs = {"repo_id": repo_id, "local_files_only": local_files_only}
    folder = snapshot_download(allow_patterns=["*.json", "*.safetensors"], **kwargs)
    if not any(Path(folder).glob("*.safetensors")):  # older repos hold only .bin weights
        folder = snapshot_download(allow_patterns=["*.json", "*.bin"], **kwargs)
    return folder


class L2SP:
    """``weight`` x the squared L2 distance of ``parameters`` from their values now.

    L2-SP (Li, Grandvalet and Davoine, ICML 2018): fine-tuning pulled toward the pretrained
    weights instead of toward zero. Create it before a checkpoint is recovered, so that "now" is
    the pretrained model. One multi-tensor subtraction and norm (a few kernels for all of WavLM's
    tensors, no host sync); the copies cost one more set of WavLM's weights in memory.
    """

    def __init__(self, parameters, weight: float):
        self.parameters = list(parameters)
        self.anchors = [p.detach().clone() for p in self.parameters]
        self.weight = weight

    def __call__(self) -> torch.Tensor:
        """The penalty (a 0-d tensor with gradients toward the anchors)."""
        distances = torch._foreach_norm(torch._foreach_sub(self.parameters, self.anchors))
        return self.weight * torch.stack(distances).float().pow(2).sum()


#: ``margin_type``: AM-Softmax (cos - m) or additive angular margin (cos(theta + m)).
MARGIN_TYPES = ("am", "aam")
#: ``scale_mode``: fixed, or the AdaCos rule.
SCALE_MODES = ("fixed", "adaptive")


class MarginSoftmax(nn.Module):
    """AM-Softmax or AAM-Softmax loss on cosine logits, with scale modes and margin warm-up.

    Arguments:
    ---------
    margin_type : str
        "am" (AM-Softmax, cos(theta) - m) or "aam" (additive angular margin, cos(theta + m)).
    margin, scale : float
        Final margin and (initial) scale.
    scale_mode : str
        "fixed" or "adaptive" (AdaCos rule, updated per batch).
    n_classes : int
        Needed by the adaptive scale (its initial value is sqrt(2) * log(C - 1)).
    margin_warmup_epochs : float
        Ramp the margin linearly from 0 over this many epochs (0: no warm-up).

    """

    def __init__(
        self,
        margin_type="am",
        margin=0.2,
        scale=30.0,
        scale_mode="fixed",
        n_classes=None,
        margin_warmup_epochs=0.0,
        easy_margin=False,
    ):
        super().__init__()
        if margin_type not in MARGIN_TYPES or scale_mode not in SCALE_MODES:
            raise ValueError(
                f"margin_type {margin_type!r} / scale_mode {scale_mode!r}: expected one of "
                f"{MARGIN_TYPES} / {SCALE_MODES}"
            )
        if margin_type == "am":
            self.margin_fn = AngularMargin(margin, scale)
        else:
            self.margin_fn = AdditiveAngularMargin(margin, scale, easy_margin)
        self.loss = LogSoftmaxWrapper(self.margin_fn)
        self.final_margin, self.scale_mode = margin, scale_mode
        self.margin_warmup_epochs = margin_warmup_epochs
        # Buffers are saved in checkpoints, so a resumed run continues the same schedule. The
        # margin is computed from a host copy: reading the buffer each step would wait for the GPU.
        self.register_buffer("progress", torch.zeros(()))
        self._progress = 0.0
        self.register_load_state_dict_post_hook(MarginSoftmax._progress_loaded)
        if scale_mode == "adaptive":
            if not n_classes or n_classes < 2:
                raise ValueError("scale_mode 'adaptive' needs n_classes >= 2")
            self.register_buffer(
                "adaptive_scale", torch.tensor(math.sqrt(2) * math.log(n_classes - 1))
            )
        self._apply_margin(self.current_margin())

    def set_progress(self, epochs: float) -> None:
        """Tell the loss how far training is (in epochs, fractional) for the margin warm-up."""
        self.progress.fill_(epochs)
        self._progress = float(epochs)
        self._apply_margin(self.current_margin())

    @staticmethod
    def _progress_loaded(module, incompatible_keys) -> None:
        """After a checkpoint is loaded: the host copy of the progress and its margin."""
        module.set_progress(float(module.progress))

    def current_margin(self) -> float:
        """The margin in force now."""
        if self.margin_warmup_epochs <= 0:
            return self.final_margin
        return self.final_margin * min(1.0, self._progress / self.margin_warmup_epochs)

    def current_scale(self) -> float:
        """The scale in force now."""
        if self.scale_mode == "adaptive":
            return float(self.adaptive_scale)
        return float(self.margin_fn.scale)

    def _apply_margin(self, margin: float) -> None:
        """Set the margin, with AdditiveAngularMargin's derived constants."""
        self.margin_fn.margin = margin
        if isinstance(self.margin_fn, AdditiveAngularMargin):
            self.margin_fn.cos_m, self.margin_fn.sin_m = math.cos(margin), math.sin(margin)
            self.margin_fn.th = math.cos(math.pi - margin)
            self.margin_fn.mm = math.sin(math.pi - margin) * margin

    @torch.no_grad()
    def _update_adaptive_scale(self, cosine: torch.Tensor, targets: torch.Tensor) -> None:
        """AdaCos (Zhang et al., 2019): s = log(B_avg) / cos(min(pi/4, median target angle))."""
        one_hot = F.one_hot(targets, cosine.shape[1]).bool()
        b_avg = torch.where(one_hot, 0.0, torch.exp(self.adaptive_scale * cosine)).sum(1).mean()
        target_cosine = cosine.gather(1, targets[:, None])  # not cosine[one_hot]: no host sync
        theta = torch.acos(target_cosine.clamp(-1 + 1e-7, 1 - 1e-7))
        theta_med = torch.clamp(theta.median(), max=math.pi / 4)
        self.adaptive_scale.copy_(torch.log(b_avg.clamp(min=1e-12)) / torch.cos(theta_med))

    def forward(self, cosine: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss for cosine logits ``[B, 1, C]`` and class targets ``[B, 1]``."""
        cosine = cosine.float()
        if self.scale_mode == "adaptive" and self.training:
            self._update_adaptive_scale(cosine.squeeze(1), targets.squeeze(1).long())
        if self.scale_mode == "adaptive":
            self.margin_fn.scale = self.adaptive_scale
        return self.loss(cosine, targets)


def build_choice(options: dict, choice: str):
    """Build ``options[choice]`` (a ``!name:`` constructor): how the YAML selects a variant."""
    if choice not in options:
        raise ValueError(f"unknown choice {choice!r}; expected one of {sorted(options)}")
    return options[choice]()


def switched(*pairs) -> list:
    """The modules of ``[module, on]`` pairs whose switch is on: per-augmentation YAML switches."""
    return [module for module, on in pairs if on]
