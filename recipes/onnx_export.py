"""ONNX copies of an exported model (``model.onnx``, ``model.int8.onnx``) and their checks.

``recipes/export_model.py`` calls ``write_onnx_models`` on the folder's own model (the one its
SpeechBrain copy loads) and publishes the folder only if its ``check_onnx`` passes: the fp32
graph must give the trained model's embeddings (``graph_agreement``: cosine above the export's
``MIN_COSINE``) and phrase log-posteriors, and the LLRs and decisions of the export's check
sample of validation trials (``trial_agreement``, within ``MAX_LLR_DIFFERENCE``). The int8 copy
is not held to that: its agreement on the sample (and, with ``export_int8_metrics``, its
metrics on every labelled split) is stated in the model card.

The graph is exported with torch.onnx's dynamo exporter (``torch.export``): the TorchScript one
fails on the waveform normalization, a ``layer_norm`` over the input's dynamic length. One
waveform ``wav [1, samples]`` in (any length the recipe scores), the named outputs
(``output_names``) out; ``onnxruntime``'s dynamic quantization makes the int8 copy (weights of
the matrix products in int8, activations quantized on the fly).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from recipes.model.onnx_verifier import ONNX_INPUT, ONNX_INT8_MODEL, ONNX_MODEL, OnnxVerifier
from recipes.model.speaker_model import WavLMSpeakerEmbedder, per_utterance
from recipes.model.trial_decisions import SDSV_COSTS, bayes_threshold, cosine

#: The largest difference of a validation trial's LLR (or cosine) between ONNX and PyTorch that
#: passes.
MAX_LLR_DIFFERENCE = 1e-3


class OnnxGraph(nn.Module):
    """``wav [1, T]`` -> the model's per-utterance outputs ``[1, D]``, in ``names`` order."""

    def __init__(self, model: WavLMSpeakerEmbedder, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One WavLM pass: the speaker embedding and, with a phrase branch, its outputs."""
        outputs = per_utterance(self.model.embed_all(wav))
        return tuple(outputs[name] for name in self.names)


def output_names(model: WavLMSpeakerEmbedder) -> tuple[str, ...]:
    """What the graph returns: ``speaker``, and ``phrase_logp`` / ``phrase_embedding``."""
    if getattr(model, "phrase_branch", None) is None:
        return ("speaker",)
    return ("speaker", "phrase_logp", "phrase_embedding")


def sample_range(audio) -> tuple[int, int | None]:
    """The waveform lengths the graph takes: the shortest scored file to the longest (or none)."""
    shortest = max(2, math.ceil(audio.min_audio_seconds * audio.sample_rate))
    longest = int(audio.max_eval_seconds * audio.sample_rate) if audio.max_eval_seconds else None
    return shortest, longest


def write_onnx_models(folder: Path, model: WavLMSpeakerEmbedder, audio) -> tuple[str, ...]:
    """Write ``model.onnx`` and ``model.int8.onnx`` of ``model`` (fp32, eval) into ``folder``.

    Returns the graph's output names.
    """
    names = output_names(model)
    shortest, longest = sample_range(audio)
    example = torch.randn(1, min(max(2 * audio.sample_rate, shortest), longest or math.inf))
    bounds = {"min": shortest} if longest is None else {"min": shortest, "max": longest}
    samples = torch.export.Dim("samples", **bounds)
    graph = OnnxGraph(model.cpu().eval(), names).eval()
    with torch.no_grad():
        torch.onnx.export(
            graph,
            (example,),
            str(folder / ONNX_MODEL),
            input_names=[ONNX_INPUT],
            output_names=list(names),
            dynamic_shapes={"wav": {1: samples}},
            dynamo=True,
            external_data=False,  # one file (a Base+ model is far below protobuf's 2 GB)
            verbose=False,
        )
    quantize_int8(folder / ONNX_MODEL, folder / ONNX_INT8_MODEL)
    return names


#: What the int8 copy quantizes: the matrix products (the transformer, the heads). Not the
#: convolutions: onnxruntime's ConvInteger made the whole model 0.46-0.82x as fast as fp32 on
#: this project's CPU, where int8 matrix products alone made it 1.6x as fast at Base+ size
#: (docs/performance.md, "Extraction backends").
QUANTIZED_OPS = ("MatMul", "Gemm")


def quantize_int8(source: Path, target: Path) -> None:
    """The dynamically quantized (int8 weights, ``QUANTIZED_OPS``) copy of ONNX model ``source``."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # onnxruntime logs a line per tensor at INFO on the root logger
    try:
        quantize_dynamic(
            source, target, op_types_to_quantize=list(QUANTIZED_OPS), weight_type=QuantType.QInt8
        )
    finally:
        root.setLevel(level)


def onnx_facts(names) -> dict:
    """The ``"onnx"`` entry of ``export.json``: the models, the graph's input and its outputs.

    The decisions are not here: both backends read them from the folder's ``hyperparams.yaml``.
    """
    return {
        "model": ONNX_MODEL,
        "int8_model": ONNX_INT8_MODEL,
        "input": ONNX_INPUT,
        "outputs": list(names),
    }


def speaker_decisions(audio, thresholds: dict) -> dict:
    """The decision data (``DECISION_KEYS``) of a speaker-only model: no phrase branch, no fusion.

    For ONNX models without an export folder around them (``OnnxVerifier(decisions=...)``: the
    benchmarks, the tests); an export's own are in its ``hyperparams.yaml``.
    """
    return {
        "sample_rate": audio.sample_rate,
        "max_eval_seconds": audio.max_eval_seconds,
        "min_audio_seconds": audio.min_audio_seconds,
        "operating_point": "eer",
        "thresholds": thresholds,
        "phrase_labels": None,
        "fusion": None,
        "costs": SDSV_COSTS,
        "cohort_top_k": None,
    }


@torch.no_grad()
def graph_agreement(verifier: OnnxVerifier, model: WavLMSpeakerEmbedder, wavs) -> dict:
    """Min speaker-embedding cosine and max phrase log-posterior difference, ONNX vs ``model``."""
    cosines, logp = [], [0.0]
    for wav in wavs:
        reference = per_utterance(model.embed_all(wav[None].float()))
        onnx = verifier.embed_waveform(wav.numpy())
        cosines.append(cosine(reference["speaker"][0].numpy(), onnx["speaker"]))
        if "phrase_logp" in reference:
            difference = np.abs(reference["phrase_logp"][0].numpy() - onnx["phrase_logp"]).max()
            logp.append(float(difference))
    return {"onnx_min_cosine": min(cosines), "onnx_phrase_max_logp_difference": max(logp)}


def trial_agreement(name: str, reference, candidate, threshold: float) -> dict:
    """How far ``candidate`` scores of trials are from ``reference`` ones, and decisions differ.

    ``threshold``: the decisions' (the Bayes threshold of LLRs, or a calibrated cosine one).
    The keys are ``<name>_trials``, ``<name>_max_score_difference`` and
    ``<name>_decisions_differing``.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    return {
        f"{name}_trials": int(reference.size),
        f"{name}_max_score_difference": float(np.abs(reference - candidate).max()),
        f"{name}_decisions_differing": int(
            ((reference >= threshold) != (candidate >= threshold)).sum()
        ),
    }


def decision_threshold(thresholds: dict, operating_point: str, fused: bool) -> float:
    """The threshold validation decisions are compared at: SdSV's Bayes one, or the 1-utt one."""
    if fused:
        return bayes_threshold(**SDSV_COSTS)
    return float(thresholds[operating_point]["1"])
