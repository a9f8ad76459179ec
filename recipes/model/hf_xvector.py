"""A trained x-vector model as transformers' ``WavLMForXVector``, with the same embeddings.

The export's ``hf/`` folder (``recipes/export_model.py``): our x-vector head's BatchNorms are
folded into the layers that follow them, so the weights fit HF's layout exactly, and
``recipe_input`` is the input the recipe feeds WavLM (what the HF copy must agree on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import WavLMConfig, WavLMForXVector

from recipes.model.speaker_model import WavLMSpeakerEmbedder, XVectorHead


def batchnorm_affine(norm: torch.nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` per channel."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


@torch.no_grad()
def folded_head_weights(head: XVectorHead) -> dict:
    """The head's weights with HF ``WavLMForXVector`` names, BatchNorms folded into next layers.

    Our blocks are conv -> ReLU -> BatchNorm. In eval mode that BatchNorm is ``a * x + b`` per
    channel, which the next conv absorbs (``W * a`` over its input channels, bias ``+ W b``).
    After the last block it goes through the pooling: mean -> ``a * mean + b``, std ->
    ``|a| * std``, which the embedding layer absorbs.
    """
    weights = {"projector.weight": head.projector.weight, "projector.bias": head.projector.bias}
    scale, shift = None, None
    for i, (conv, norm) in enumerate(zip(head.tdnn, head.norms, strict=True)):
        w, b = conv.weight, conv.bias
        if scale is not None:
            b = b + torch.einsum("oik,i->o", w, shift)
            w = w * scale[None, :, None]
        # HF keeps the kernel as a Linear over (kernel position, input channel) pairs.
        weights[f"tdnn.{i}.kernel.weight"] = w.transpose(1, 2).reshape(w.shape[0], -1)
        weights[f"tdnn.{i}.kernel.bias"] = b
        scale, shift = batchnorm_affine(norm)
    e = head.embedding.weight
    channels = e.shape[1] // 2
    weights["feature_extractor.weight"] = torch.cat(
        [e[:, :channels] * scale, e[:, channels:] * scale.abs()], dim=1
    )
    weights["feature_extractor.bias"] = head.embedding.bias + e[:, :channels] @ shift
    return {k: v.detach().clone().contiguous() for k, v in weights.items()}


def hf_xvector_model(model: WavLMSpeakerEmbedder, classifier, labels: list[str]):
    """The model (x-vector head) as a ``WavLMForXVector`` with the same embeddings.

    The cosine classifier's weights become HF's AM-Softmax weights (``objective.weight``) and
    HF's ``classifier`` layer is the identity, so HF's training loss sees our class weights.
    """
    head = model.head
    config = WavLMConfig(
        **{
            **model.encoder.model.config.to_diff_dict(),
            "use_weighted_layer_sum": model.layer_logits is not None,
            "tdnn_dim": [conv.out_channels for conv in head.tdnn],
            "tdnn_kernel": [conv.kernel_size[0] for conv in head.tdnn],
            "tdnn_dilation": [conv.dilation[0] for conv in head.tdnn],
            "xvector_output_dim": head.embedding.out_features,
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
            "architectures": ["WavLMForXVector"],
        }
    )
    hf = WavLMForXVector(config)
    state = {f"wavlm.{k}": v for k, v in model.encoder.model.state_dict().items()}
    state.update(folded_head_weights(head))
    if model.layer_logits is not None:
        state["layer_weights"] = model.layer_logits.detach().clone()
    dim = head.embedding.out_features
    state["classifier.weight"], state["classifier.bias"] = torch.eye(dim), torch.zeros(dim)
    state["objective.weight"] = classifier.weight.detach().t().clone()
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def recipe_input(wav: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``[1, T]`` model input of a waveform ``[T]`` as the recipe feeds WavLM.

    Zero mean, unit variance (eps 1e-5) when the model's feature extractor says ``do_normalize``
    (the tiny demo WavLM); the raw waveform otherwise (WavLM Base+).
    """
    wav = wav[None]
    return F.layer_norm(wav, wav.shape[1:]) if normalize else wav
