"""The model card (``README.md``) of an exported folder, from its facts (``export.json``).

What the model is, its metrics on every labelled split (the recipe's report for that checkpoint
and fusion), its thresholds, the ONNX checks, and how to use it from SpeechBrain, ``transformers``,
onnxruntime and the command line (``recipes/export_model.py`` writes it).
"""

from __future__ import annotations

from pathlib import Path

#: Why a head other than the x-vector one gets no ``hf/`` folder (log line and model card).
NO_HF_FOLDER = (
    "transformers' WavLMForXVector holds only the x-vector head, not the {head} head: "
    "use this SpeechBrain folder"
)


def _scoring_note(facts: dict) -> str:
    """What the model card's scores are, and what the HF folder (if any) cannot do."""
    if not facts["hf_folder"]:
        hf = f"No `hf/` folder: {NO_HF_FOLDER.format(head=facts['head'].rsplit('.', 1)[-1])}."
    elif facts["fusion"]:
        hf = (
            "The phrase check needs this SpeechBrain folder: `hf/` is the speaker embedder "
            "alone (`WavLMForXVector` has no phrase branch)."
        )
    else:
        hf = ""
    if not facts["fusion"]:
        return f"Scores are cosines of speaker embeddings (speaker verification only). {hf}".strip()
    quality = ", ".join(facts["fusion"].get("quality", []))
    quality = f", weighting the quality measures {quality} (fusion_quality)" if quality else ""
    return (
        f"Scores are calibrated log-likelihood ratios (fusion `{facts['fusion']['kind']}`, "
        "learned on the validation trials) of the speaker score and the pass-phrase score (the "
        "phrase branch's log-posterior of the enrolled phrase, over the classes "
        f"{', '.join(facts['phrase_labels'])}){quality}; decisions are taken at the Bayes "
        f"threshold of the SdSV costs. {hf}"
    ).strip()


def model_card(facts: dict, folder: Path) -> str:
    """The folder's README: what the model is, how it scores, how to use it."""
    lines = [
        "# Text-dependent speaker verification: WavLM + speaker head",
        "",
        f"Exported by `recipes/export_model.py` from checkpoint `{facts['checkpoint']}` "
        f"(WavLM `{facts['wavlm_source']}`, head `{facts['head']}`, "
        f"{facts['training_classes']} training classes of type `{facts['target_type']}`).",
        "",
        "## Results of this checkpoint (no score normalization)",
        "",
        _scoring_note(facts),
        "",
        f"The recipe's scores of this checkpoint (its report; embedded in "
        f"`{facts['eval_precision']}`, batched). This folder's own model (fp32, one utterance at "
        f"a time) agrees with them {agreement(facts['checks'], 'folder')}.",
        "",
        "| split | condition | EER (%) | minDCF (SdSV) | actDCF | Cllr | targets | non-targets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, conditions in facts["metrics"].items():
        for name, m in conditions.items():
            calibration = f"{m['act_dcf']:.3f} | {m['cllr']:.3f}" if "act_dcf" in m else "- | -"
            lines.append(
                f"| {split} | {name} | {m['eer']:.2f} | {m['min_dcf']:.3f} | {calibration} | "
                f"{m['targets']} | {m['nontargets']} |"
            )
    thresholds = facts["thresholds"]
    lines += [
        "",
        "## Decision thresholds (calibrated on the validation trials)",
        "",
        "Accept when `score >= threshold`. Default operating point: "
        f"`{facts['operating_point']}` (change it in `hyperparams.yaml`, which both backends "
        "read, or pass `threshold=`).",
        "",
        "| enrollment utterances | EER threshold | minDCF threshold |",
        "|---|---|---|",
    ]
    for n, value in thresholds["eer"].items():
        lines.append(f"| {n} | {value:.4f} | {thresholds['min_dcf'][n]:.4f} |")
    lines += onnx_card(facts)
    usage = SB_USAGE + (HF_USAGE if facts["hf_folder"] else "")
    usage += (ONNX_USAGE if facts.get("onnx") else "") + CLI_USAGE
    lines += ["", "## Use", "", usage.format(folder=folder).rstrip(), ""]
    return "\n".join(lines)


def agreement(checks: dict, name: str) -> str:
    """``checks``' agreement on the check sample, in words (``trial_agreement``'s keys)."""
    return (
        f"on the {checks[f'{name}_trials']} sampled validation trials, scores within "
        f"{checks[f'{name}_max_score_difference']:.1e}, "
        f"{checks[f'{name}_decisions_differing']} decisions differing"
    )


def onnx_card(facts: dict) -> list[str]:
    """The model card's ONNX section: the checks, and int8's metrics beside fp32's if measured."""
    if not facts.get("onnx"):
        return []
    checks = facts["checks"]
    lines = [
        "",
        "## ONNX (`model.onnx`, `model.int8.onnx`)",
        "",
        f"`model.onnx` (fp32) was checked against this folder's PyTorch model: embedding cosine "
        f">= {checks['onnx_min_cosine']:.6f}; {agreement(checks, 'onnx')}. `model.int8.onnx` "
        "(weights of the matrix products in int8, onnxruntime's dynamic quantization) decides "
        f"with the same thresholds and fusion; {agreement(checks, 'int8')}.",
    ]
    if not facts["onnx_int8_metrics"]:
        return lines
    lines += [
        "",
        "| split | model | EER (%) | minDCF (SdSV) | actDCF |",
        "|---|---|---|---|---|",
    ]
    for split, int8 in facts["onnx_int8_metrics"].items():
        for name, m in (("fp32", facts["metrics"][split]["pooled"]), ("int8", int8["pooled"])):
            act = f"{m['act_dcf']:.3f}" if "act_dcf" in m else "-"
            lines.append(f"| {split} | {name} | {m['eer']:.2f} | {m['min_dcf']:.3f} | {act} |")
    return lines


SB_USAGE = """\
SpeechBrain: this folder alone, no recipe repository (`tdsv_speaker_model.py` is self-contained).
`foreign_class` runs this folder's code (its `hyperparams.yaml` and `tdsv_speaker_model.py`): load
it from a source you trust. The recipe's repository reads it as data instead (`--model` below,
`recipes.evaluation.pretrained.load_verifier`):

```python
from speechbrain.inference.interfaces import foreign_class

verifier = foreign_class(source="{folder}", pymodule_file="tdsv_speaker_model.py",
                         classname="TDSVSpeakerRecognition", savedir="pretrained_models/tdsv")
score, accept = verifier.verify_files("enrol.wav", "test.wav")
score, accept = verifier.verify_enrolment(["e1.wav", "e2.wav", "e3.wav"], "test.wav")
verdict = verifier.verify_trial(["e1.wav", "e2.wav", "e3.wav"], "test.wav")  # + phrase check
print(verdict.speaker_score, verdict.phrase_score, verdict.score, verdict.accept, verdict.reason)
embeddings = verifier.encode_batch(wavs)  # [batch, 1, dim]
```

On the Hugging Face hub: upload the whole folder (`huggingface-cli login`, then
`huggingface-cli upload USER/MODEL {folder} .`: the token stays in your Hugging Face
configuration, never in the folder), and load it with `source="USER/MODEL"` and a `savedir`, as
above. The export checked this load before publishing the folder.

"""
#: The model card's Hugging Face part (only for a folder with ``hf/``).
HF_USAGE = """\
Hugging Face `transformers` (x-vector head only):

```python
import soundfile as sf, torch
from transformers import AutoFeatureExtractor, WavLMForXVector

model = WavLMForXVector.from_pretrained("{folder}/hf").eval()  # hub: ("USER/MODEL", subfolder="hf")
extractor = AutoFeatureExtractor.from_pretrained("{folder}/hf")
wav, rate = sf.read("test.wav")  # 16 kHz mono
inputs = extractor(wav, sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    embedding = model(**inputs).embeddings  # compare with torch.cosine_similarity
```

"""
#: The model card's torch-free part (only for a folder with ONNX models).
ONNX_USAGE = """\
ONNX, without PyTorch (`pip install onnxruntime numpy soundfile pyyaml`; 16 kHz audio), with this
folder's own `tdsv_onnx_verifier.py` (its code runs: a source you trust; the recipe's repository
has the same class, `recipes.model.onnx_verifier.OnnxVerifier`, reading the folder as data):

```python
import sys
sys.path.insert(0, "{folder}")  # hub: huggingface_hub.snapshot_download("USER/MODEL")
from tdsv_onnx_verifier import OnnxVerifier  # self-contained: onnxruntime, numpy, soundfile, yaml

verifier = OnnxVerifier("{folder}")  # model="model.int8.onnx": the quantized copy
verdict = verifier.verify_trial(["e1.wav", "e2.wav", "e3.wav"], "test.wav")
print(verdict.score, verdict.accept, verdict.reason)
```

"""
CLI_USAGE = """\
Command line (from the recipe repository; the folder is read as data, nothing in it runs):

```
python recipes/verify_speakers.py files --model {folder} --enrol e1.wav e2.wav e3.wav --test t.wav
python recipes/verify_speakers.py files --model {folder} --backend onnx --pairs pairs.txt
```
"""
