"""How much of WavLM a run trains: all of it, low-rank adapters (LoRA) only, or none of it.

``wavlm_tuning`` (``TUNING_MODES``):

- ``full``: every WavLM weight trains (the CNN as ``freeze_cnn`` says), as before stages existed.
- ``lora``: WavLM's weights are frozen and SpeechBrain's ``LoRA`` adapters (``W x + s B A x``,
  ``s = alpha / rank``, ``B`` zero at the start) are inserted on the linear layers named in
  ``lora_targets`` of every transformer layer; only they, the layer weights and the heads train.
- ``frozen``: WavLM is a fixed feature extractor; the layer weights and the heads train.

The adapters are inserted in place (the module keeps its name, its weights move under
``pretrained_module``), not through SpeechBrain's ``AdaptedModel``: that wrapper renames every
parameter (``adapted_model.``), which would make the checkpoints of a LoRA run unreadable by the
code that scores, exports and starts a new stage from them. ``merge_lora`` folds the adapters
back into plain linear layers, so an export of a LoRA run is a plain WavLM (``hf/``, ONNX).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from speechbrain.nnet.adapters import LoRA, replace_module
from torch import nn

#: ``wavlm_tuning``: which of WavLM's weights train.
TUNING_MODES = ("full", "lora", "frozen")
#: ``lora_targets``: the linear layers of a WavLM transformer layer an adapter may wrap.
LORA_TARGETS = (
    "q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense",
)  # fmt: skip
#: The attention projections: adapted only with ``wavlm_attention: sdpa``; transformers' own
#: ("eager") attention reads their weight tensors directly, past any adapter.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


class WavLMTuning(NamedTuple):
    """What of WavLM trains (``mode``, one of ``TUNING_MODES``) and the adapters' shape."""

    mode: str = "full"
    rank: int = 16
    alpha: float = 32.0
    targets: tuple = ATTENTION_PROJECTIONS

    @property
    def scaling(self) -> float:
        """LoRA's ``alpha / rank``: the factor of the low-rank update."""
        return self.alpha / self.rank


def adapt_wavlm(wavlm: nn.Module, tuning: WavLMTuning | None) -> None:
    """Apply ``tuning`` to the HF WavLM ``wavlm`` in place (idempotent: the encoder is shared).

    ``full`` changes nothing; ``frozen`` stops every weight's gradient; ``lora`` does too, then
    wraps each targeted linear layer of every transformer layer in a trainable ``LoRA``.
    """
    if tuning is None or tuning.mode == "full":
        return
    if tuning.mode not in TUNING_MODES:
        raise ValueError(f"wavlm_tuning must be one of {TUNING_MODES}, not {tuning.mode!r}")
    for name, parameter in wavlm.named_parameters():
        if not is_adapter_key(name):  # an adapter already in place keeps training
            parameter.requires_grad_(False)
    if tuning.mode == "lora":
        for name in adapted_layer_names(wavlm, tuning.targets):
            layer = wavlm.get_submodule(name)
            if not isinstance(layer, LoRA):
                replace_module(wavlm, name, LoRA(layer, rank=tuning.rank, alpha=tuning.alpha))


def adapted_layer_names(wavlm: nn.Module, targets) -> list[str]:
    """The module names of ``wavlm``'s transformer layers' linear layers named in ``targets``."""
    names = []
    for name, module in wavlm.named_modules():
        parts = name.split(".")
        in_layer = "layers" in parts and not name.endswith("pretrained_module")
        if in_layer and parts[-1] in targets and isinstance(module, nn.Linear | LoRA):
            names.append(name)
    return names


@torch.no_grad()
def merge_lora(wavlm: nn.Module) -> int:
    """Fold every ``LoRA`` of ``wavlm`` into a plain linear layer (``W + s B A``); how many.

    The merged layer computes what the adapted one did (tested); an exported model has no
    adapter left (``hf/``, ONNX and the folder's own model are a plain WavLM).
    """
    adapted = [(n, m) for n, m in wavlm.named_modules() if isinstance(m, LoRA)]
    for name, lora in adapted:
        layer = lora.pretrained_module
        update = lora.adapter_up_proj.weight @ lora.adapter_down_proj.weight
        layer.weight.add_(update.to(layer.weight.dtype), alpha=lora.scaling)
        replace_module(wavlm, name, layer)
    return len(adapted)


def merged_state(state: dict, scaling: float) -> dict:
    """A checkpoint's state dict with its LoRA entries folded into plain weights (``merge_lora``).

    For a new stage that starts from a LoRA run (``scaling``: that run's ``alpha / rank``).
    """
    merged = {}
    for key, value in state.items():
        if is_adapter_key(key):
            continue
        if ".pretrained_module." in key:
            prefix, leaf = key.split(".pretrained_module.")
            if leaf == "weight":
                up = state[f"{prefix}.adapter_up_proj.weight"]
                down = state[f"{prefix}.adapter_down_proj.weight"]
                value = value + scaling * (up.float() @ down.float()).to(value.dtype)
            key = f"{prefix}.{leaf}"
        merged[key] = value
    return merged


def plain_name(key: str) -> str:
    """A parameter's name without the adapter's wrapping (``x.pretrained_module.w`` -> ``x.w``)."""
    return key.replace(".pretrained_module.", ".")


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is a LoRA adapter's own weight."""
    return ".adapter_down_proj." in key or ".adapter_up_proj." in key
