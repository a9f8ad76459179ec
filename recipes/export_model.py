#!/usr/bin/env python3
"""Export the best checkpoint of a run as a model folder for SpeechBrain and Hugging Face.

    python recipes/export_model.py hparams/synthetic_demo.yaml
    python recipes/export_model.py hparams/wavlm_td.yaml --data_folder /data/task1 \
        --export_folder models/wavlm_td

Writes ``export_folder`` (default ``<output_folder>/export``):

- ``hyperparams.yaml``, ``tdsv_speaker_model.py`` (the model code, a copy of
  ``recipes/speaker_model.py``) and ``embedding_model.ckpt`` (WavLM, layer weights and head in one
  state dict): a self-contained SpeechBrain inference folder, loaded offline with
  ``foreign_class(source=folder, pymodule_file="tdsv_speaker_model.py",
  classname="TDSVSpeakerRecognition")``;
- thresholds calibrated on the dev trials (EER and minDCF operating points, for 1 .. N enrollment
  utterances), recorded in ``hyperparams.yaml`` and used by ``verify_files`` by default;
- ``label_encoder.txt`` (the training classes), ``README.md`` (a model card with the dev / eval
  metrics of this checkpoint) and ``export.json`` (the same facts, machine-readable);
- ``hf/``: the same model as a ``transformers.WavLMForXVector`` directory (x-vector head only;
  the head's BatchNorm layers are folded into the following layers, so the weights fit HF's
  layout exactly).

The export is checked before it is published: the folder is loaded back and its embeddings of a
few dev utterances must equal the trained model's (and so must the HF model's).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import speechbrain as sb
import torch
import torch.nn.functional as F
from hyperpyyaml import load_hyperpyyaml
from transformers import WavLMConfig, WavLMForXVector

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.pretrained import EXPORTED_MODULE, load_verifier
from recipes.scoring import metrics_by_condition, score_trials, trial_metrics
from recipes.speaker_model import WavLMSpeakerEmbedder, XVectorHead
from recipes.train_speaker_embeddings import build_brain, dataio_prep, prepare_data
from recipes.verification import best_checkpoint, check_splits, split_embeddings

#: Config entries that describe where a model came from, not what it is.
BOOKKEEPING = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype")
#: The smallest cosine between an exported and the original embedding that passes the check.
MIN_COSINE = 0.9999


# ------------------------------------------------------------------------------------------------
# Calibration and metrics
# ------------------------------------------------------------------------------------------------
def enrolment_thresholds(table, models: pd.DataFrame, trials: pd.DataFrame) -> dict:
    """Dev thresholds ``{"eer": {n: t}, "min_dcf": {n: t}}`` for ``n`` enrollment utterances.

    Scores of a model made of fewer utterances are lower for targets, so one threshold does not
    fit all: each ``n`` is calibrated on the same trials with models made of their first ``n``
    enrollment utterances.
    """
    enrol_lists = models["enrol_ids"].str.split()
    thresholds = {"eer": {}, "min_dcf": {}}
    for n in range(1, int(enrol_lists.map(len).max()) + 1):
        first_n = models.assign(enrol_ids=enrol_lists.map(lambda ids, n=n: " ".join(ids[:n])))
        pooled = metrics_by_condition(score_trials(table, first_n, trials), trials["condition"])
        if "pooled" not in pooled:
            raise ValueError("the dev trials need targets (TC) and non-targets to calibrate")
        thresholds["eer"][n] = round(pooled["pooled"]["eer_threshold"], 6)
        thresholds["min_dcf"][n] = round(pooled["pooled"]["min_dcf_threshold"], 6)
    return thresholds


def split_metrics(tables: dict, splits: dict) -> dict:
    """Metrics by condition of every labelled split (the model card's numbers)."""
    results = {}
    for split, (_, models, trials) in splits.items():
        metrics = trial_metrics(score_trials(tables[split], models, trials), trials)
        if metrics:
            results[split] = metrics
    return results


# ------------------------------------------------------------------------------------------------
# The embedding model
# ------------------------------------------------------------------------------------------------
def head_spec(hparams) -> tuple[str, dict]:
    """The head's class path inside the export and its constructor arguments."""
    constructor = hparams["heads"][hparams["head_type"]]
    module, name = constructor.func.__module__, constructor.func.__qualname__
    if module == "recipes.speaker_model":
        module = Path(EXPORTED_MODULE).stem
    elif module.startswith("recipes."):
        raise ValueError(f"{module}.{name} is not in recipes/speaker_model.py: cannot export it")
    return f"{module}.{name}", dict(constructor.keywords)


def wavlm_settings(wavlm) -> dict:
    """``WavLMSpeakerEmbedder`` arguments that reproduce the recipe's ``WavLMEncoder``.

    (``WavLMEncoder`` refuses ``output_norm``, which ``WavLMSpeakerEmbedder`` does not have.)
    """
    config = {k: v for k, v in wavlm.model.config.to_diff_dict().items() if k not in BOOKKEEPING}
    return {
        "wavlm_config": config,
        "layer_weighting": wavlm.layer_logits is not None,
        "normalize_wav": bool(wavlm.normalize_wav),
    }


def trained_embedder(brain, settings: dict, head: torch.nn.Module) -> WavLMSpeakerEmbedder:
    """A ``WavLMSpeakerEmbedder`` holding the brain's trained weights (eval mode)."""
    wavlm = brain.unwrapped("wavlm")
    embedder = WavLMSpeakerEmbedder(head=head, **settings)
    embedder.model.load_state_dict(wavlm.model.state_dict())
    if wavlm.layer_logits is not None:
        embedder.layer_logits.data.copy_(wavlm.layer_logits.data)
    embedder.head.load_state_dict(brain.unwrapped("embedding_model").state_dict())
    return embedder.eval()


# ------------------------------------------------------------------------------------------------
# Hugging Face WavLMForXVector
# ------------------------------------------------------------------------------------------------
def batchnorm_affine(norm: torch.nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` per channel (identity for no norm)."""
    if isinstance(norm, torch.nn.BatchNorm1d):
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return scale, norm.bias - norm.running_mean * scale
    return torch.ones(channels), torch.zeros(channels)


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
        scale, shift = batchnorm_affine(norm, w.shape[0])
    e = head.embedding.weight
    channels = e.shape[1] // 2
    weights["feature_extractor.weight"] = torch.cat(
        [e[:, :channels] * scale, e[:, channels:] * scale.abs()], dim=1
    )
    weights["feature_extractor.bias"] = head.embedding.bias + e[:, :channels] @ shift
    return {k: v.detach().clone().contiguous() for k, v in weights.items()}


def hf_xvector_model(embedder: WavLMSpeakerEmbedder, classifier, labels: list[str]):
    """The embedder (x-vector head) as a ``WavLMForXVector`` with the same embeddings.

    The cosine classifier's weights become HF's AM-Softmax weights (``objective.weight``) and
    HF's ``classifier`` layer is the identity, so HF's training loss sees our class weights.
    """
    head = embedder.head
    config = WavLMConfig(
        **{
            **embedder.model.config.to_diff_dict(),
            "use_weighted_layer_sum": embedder.layer_logits is not None,
            "tdnn_dim": [conv.out_channels for conv in head.tdnn],
            "tdnn_kernel": [conv.kernel_size[0] for conv in head.tdnn],
            "tdnn_dilation": [conv.dilation[0] for conv in head.tdnn],
            "xvector_output_dim": head.embedding.out_features,
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
            "architectures": ["WavLMForXVector"],
        }
    )
    model = WavLMForXVector(config)
    state = {f"wavlm.{k}": v for k, v in embedder.model.state_dict().items()}
    state.update(folded_head_weights(head))
    if embedder.layer_logits is not None:
        state["layer_weights"] = embedder.layer_logits.detach().clone()
    dim = head.embedding.out_features
    state["classifier.weight"], state["classifier.bias"] = torch.eye(dim), torch.zeros(dim)
    state["objective.weight"] = classifier.weight.detach().t().clone()
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Writing and checking the folder
# ------------------------------------------------------------------------------------------------
HYPERPARAMS = """\
# Text-dependent speaker verification model exported by recipes/export_model.py.
# Load it (offline, no repository needed):
#   from speechbrain.inference.interfaces import foreign_class
#   verifier = foreign_class(source="<this folder>", pymodule_file="{module}.py",
#                            classname="TDSVSpeakerRecognition")
#   score, accept = verifier.verify_files("enrol.wav", "test.wav")
# HyperPyYAML files are code: load only folders you trust.

sample_rate: {sample_rate}
# verify_* accept a trial when score >= threshold. Thresholds were calibrated on the dev trials
# (speakers unseen in training), per operating point and number of enrollment utterances.
operating_point: {operating_point}          # eer | min_dcf
thresholds: {thresholds}

wavlm_config: {wavlm_config}

embedding_model: !new:{module}.WavLMSpeakerEmbedder
    wavlm_config: !ref <wavlm_config>
    layer_weighting: {layer_weighting}
    normalize_wav: {normalize_wav}
    head: !new:{head_class} {head_kwargs}

audio_normalizer: !new:speechbrain.dataio.preprocess.AudioNormalizer
    sample_rate: !ref <sample_rate>

modules:
    embedding_model: !ref <embedding_model>

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
"""


def hyperparams_text(hparams, settings, thresholds, head_class, head_kwargs) -> str:
    """The exported ``hyperparams.yaml`` (JSON values are YAML flow collections)."""
    return HYPERPARAMS.format(
        module=Path(EXPORTED_MODULE).stem,
        sample_rate=hparams["sample_rate"],
        operating_point=hparams["export_operating_point"],
        thresholds=json.dumps(thresholds),
        wavlm_config=json.dumps(settings["wavlm_config"]),
        layer_weighting=settings["layer_weighting"],
        normalize_wav=settings["normalize_wav"],
        head_class=head_class,
        head_kwargs=json.dumps(head_kwargs),
    )


def reference_utterances(dataset, count: int = 3) -> list[torch.Tensor]:
    """A few waveforms to check the export with (the dataset's first ``count``)."""
    return [dataset[i]["sig"] for i in range(min(count, len(dataset)))]


@torch.no_grad()
def min_cosine(reference, candidate, wavs) -> float:
    """The smallest cosine between two embedding functions' outputs over ``wavs``."""
    cosines = [F.cosine_similarity(reference(w), candidate(w), dim=-1).min() for w in wavs]
    return float(torch.stack(cosines).min())


def check_agreement(what: str, cosine: float) -> None:
    """Fail loudly if an exported model does not reproduce the trained one."""
    if cosine < MIN_COSINE:
        raise RuntimeError(f"export check failed: {what} embeddings have cosine {cosine:.6f}")


def export(hparams, run_opts) -> Path:
    """Export the best checkpoint of the run described by ``hparams``; return the folder."""
    prepare_data(hparams)
    _, splits, _, class_encoder, phrase_encoder = dataio_prep(hparams)
    brain = build_brain(hparams, run_opts, len(class_encoder), len(phrase_encoder))
    checkpoint = best_checkpoint(brain)
    check_splits(splits)
    brain.checkpointer.recover_if_possible(min_key="EER")
    brain.modules.eval()
    cache = Path(hparams["output_folder"]) / "embeddings" / checkpoint.path.name
    tables = split_embeddings(
        lambda dataset: brain.embed(dataset, hparams["eval_dataloader_options"]), splits, cache
    )
    thresholds = enrolment_thresholds(tables["dev"], *splits["dev"][1:])
    metrics = split_metrics(tables, splits)

    settings = wavlm_settings(brain.unwrapped("wavlm"))
    head_class, head_kwargs = head_spec(hparams)
    embedder = trained_embedder(brain, settings, hparams["heads"][hparams["head_type"]]())
    wavs = reference_utterances(splits["dev"][0])

    def trained(wav):
        """The recipe's own modules, as scoring runs them (fp32)."""
        wav = wav[None].to(brain.device)
        return brain.modules.embedding_model(brain.modules.wavlm(wav)).squeeze(1).cpu()

    out = Path(hparams["export_folder"])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    torch.save(embedder.state_dict(), staging / "embedding_model.ckpt")
    shutil.copyfile(Path(__file__).with_name("speaker_model.py"), staging / EXPORTED_MODULE)
    (staging / "hyperparams.yaml").write_text(
        hyperparams_text(hparams, settings, thresholds, head_class, head_kwargs)
    )
    class_encoder.save(staging / "label_encoder.txt")
    checks = {"speechbrain_min_cosine": _check_speechbrain(staging, trained, wavs)}
    if isinstance(embedder.head, XVectorHead):
        labels = [class_encoder.ind2lab[i] for i in range(len(class_encoder))]
        hf = hf_xvector_model(embedder, brain.unwrapped("classifier"), labels)
        hf.save_pretrained(staging / "hf")
        brain.unwrapped("wavlm").feature_extractor.save_pretrained(staging / "hf")
        checks.update(_check_hf(staging / "hf", hf, trained, wavs))
    facts = {
        "checkpoint": checkpoint.path.name,
        "checkpoint_meta": checkpoint.meta,
        "wavlm_source": hparams["wavlm_source"],
        "head": head_class,
        "target_type": hparams["target_type"],
        "training_classes": len(class_encoder),
        "thresholds": thresholds,
        "operating_point": hparams["export_operating_point"],
        "metrics": metrics,
        "checks": checks,
    }
    (staging / "export.json").write_text(json.dumps(facts, indent=2))
    (staging / "README.md").write_text(model_card(facts, out))
    if out.exists():
        shutil.rmtree(out)
    staging.chmod(0o755)  # mkdtemp makes it private; a model folder is for sharing
    staging.rename(out)
    print(f"exported {checkpoint.path.name} to {out}: {json.dumps(checks)}")
    return out


def _check_speechbrain(folder: Path, trained, wavs) -> float:
    """Load the folder as a user would and compare its embeddings with the trained model's."""
    verifier = load_verifier(folder)
    cosine = min_cosine(trained, lambda w: verifier.encode_batch(w).squeeze(1).cpu(), wavs)
    check_agreement("SpeechBrain folder", cosine)
    return cosine


def _check_hf(folder: Path, hf, trained, wavs) -> dict:
    """The HF model on the recipe's input normalization (must agree) and on its own (reported)."""

    def same_input(wav):
        wav = F.layer_norm(wav[None], wav[None].shape[1:])
        return hf(input_values=wav).embeddings

    cosine = min_cosine(trained, same_input, wavs)
    check_agreement("WavLMForXVector", cosine)
    own = load_verifier(folder)  # the HF feature extractor's normalization (eps 1e-7, not 1e-5)
    own_cosine = min_cosine(trained, lambda w: own.encode_batch(w).squeeze(1).cpu(), wavs)
    return {"hf_min_cosine": cosine, "hf_feature_extractor_min_cosine": own_cosine}


def model_card(facts: dict, folder: Path) -> str:
    """The folder's README: what the model is, how it scores, how to use it."""
    lines = [
        "# Text-dependent speaker verification: WavLM + speaker head",
        "",
        f"Exported by `recipes/export_model.py` from checkpoint `{facts['checkpoint']}` "
        f"(WavLM `{facts['wavlm_source']}`, head `{facts['head']}`, "
        f"{facts['training_classes']} training classes of type `{facts['target_type']}`).",
        "",
        "## Results of this checkpoint (cosine scoring, no score normalization)",
        "",
        "| split | condition | EER (%) | minDCF (SdSV) | targets | non-targets |",
        "|---|---|---|---|---|---|",
    ]
    for split, conditions in facts["metrics"].items():
        for name, m in conditions.items():
            lines.append(
                f"| {split} | {name} | {m['eer']:.2f} | {m['min_dcf']:.3f} | "
                f"{m['targets']} | {m['nontargets']} |"
            )
    thresholds = facts["thresholds"]
    lines += [
        "",
        "## Decision thresholds (calibrated on the dev trials)",
        "",
        "Accept when `score >= threshold`. Default operating point: "
        f"`{facts['operating_point']}` (change it in `hyperparams.yaml` or pass `threshold=`).",
        "",
        "| enrollment utterances | EER threshold | minDCF threshold |",
        "|---|---|---|",
    ]
    for n, value in thresholds["eer"].items():
        lines.append(f"| {n} | {value:.4f} | {thresholds['min_dcf'][n]:.4f} |")
    lines += ["", "## Use", "", USAGE.format(folder=folder).rstrip(), ""]
    return "\n".join(lines)


USAGE = """\
SpeechBrain (offline, this folder only):

```python
from speechbrain.inference.interfaces import foreign_class

verifier = foreign_class(source="{folder}", pymodule_file="tdsv_speaker_model.py",
                         classname="TDSVSpeakerRecognition")
score, accept = verifier.verify_files("enrol.wav", "test.wav")
score, accept = verifier.verify_enrolment(["e1.wav", "e2.wav", "e3.wav"], "test.wav")
embeddings = verifier.encode_batch(wavs)  # [batch, 1, dim]
```

Hugging Face `transformers` (x-vector head only):

```python
import soundfile as sf, torch
from transformers import AutoFeatureExtractor, WavLMForXVector

model = WavLMForXVector.from_pretrained("{folder}/hf").eval()
extractor = AutoFeatureExtractor.from_pretrained("{folder}/hf")
wav, rate = sf.read("test.wav")  # 16 kHz mono
inputs = extractor(wav, sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    embedding = model(**inputs).embeddings  # compare with torch.cosine_similarity
```

Command line (from the recipe repository):

```
python recipes/verify_speakers.py --model {folder} --enrol e1.wav e2.wav e3.wav --test t.wav
```
"""


def main(argv) -> None:
    """Parse the recipe's arguments and export."""
    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    with open(hparams_file, encoding="utf-8") as handle:
        hparams = load_hyperpyyaml(handle, overrides)
    export(hparams, run_opts)


if __name__ == "__main__":
    main(sys.argv[1:])
