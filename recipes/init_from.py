"""Start a run's model from another run's best checkpoint or an exported folder (``init_from``).

A stage of a staged recipe (text-independent -> text-dependent -> large-margin fine-tuning, or a
task-1 model adapted to an in-house corpus) starts from the model of the stage before:

- the source's WavLM, layer weights and speaker head must have this run's shapes: another head,
  embedding size or WavLM is refused before data prep, naming the difference;
- the phrase branch is loaded where its shapes fit; the speaker classifier and the phrase
  classifier only where their classes are the source's, in the same order (the same corpus, as
  in large-margin fine-tuning): other classes start fresh, and the log says which and why;
- a source trained with LoRA is read with its adapters merged; this run's own adapters start at
  zero (``adaptation.WavLMTuning``).

The run records its source (``init_from.json``: where, what was loaded, the model file's digest),
and a resume whose source changed since is refused: the resume guard compares the path
(``init_from`` shapes the model), this module the digest. The weights are loaded before L2-SP
records its anchors, so L2-SP pulls toward the source's weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from speechbrain.utils.checkpoints import Checkpointer
from speechbrain.utils.distributed import if_main_process
from speechbrain.utils.logger import get_logger

from data_prep.corpus import file_digest
from recipes.model.adaptation import is_adapter_key, merged_state, plain_name
from recipes.model.onnx_verifier import EXPORT_FACTS
from recipes.settings import RUN_RECORD, raw_settings
from recipes.training.checkpointing import MODEL_RECOVERABLE

logger = get_logger(__name__)

#: The run's record of its source, in its output folder.
INIT_RECORD = "init_from.json"
#: The parts of the model that must fit the source (the phrase branch may differ).
CORE_PARTS = {"encoder": "WavLM", "layer_logits": "the layer weights", "head": "the speaker head"}


class Source(NamedTuple):
    """The model a run starts from: its weights (plain, LoRA merged) and its classes."""

    folder: Path
    kind: str  # "run" (its best checkpoint) or "export" (an exported folder)
    model_file: Path
    model: dict  # WavLMSpeakerEmbedder's state dict, adapters merged
    classifier: dict | None  # the speaker classifier's (a run only)
    class_labels: list | None  # its classes in output order
    phrase_labels: list | None  # the phrase branch's classes in output order


def read_source(folder) -> Source:
    """The model of the run or exported folder ``folder``; a clear error when it is neither."""
    folder = Path(folder)
    if (folder / EXPORT_FACTS).is_file():
        facts = json.loads((folder / EXPORT_FACTS).read_text(encoding="utf-8"))
        model_file = folder / f"{MODEL_RECOVERABLE}.ckpt"
        labels = _labels(folder / "label_encoder.txt")
        return Source(
            folder, "export", model_file, _tensors(model_file), None, labels,
            facts.get("phrase_labels"),
        )  # fmt: skip
    if (folder / RUN_RECORD).is_file() and (folder / "save").is_dir():
        checkpoint = Checkpointer(folder / "save").find_checkpoint(min_key="EER")
        if checkpoint is None:
            raise SystemExit(f"error: init_from {folder}: the run has no checkpoint yet")
        model_file = checkpoint.path / f"{MODEL_RECOVERABLE}.ckpt"
        settings = raw_settings(folder / RUN_RECORD, "")
        scaling = settings.get("lora_alpha", 32) / settings.get("lora_rank", 16)
        classifier = checkpoint.path / "classifier.ckpt"
        return Source(
            folder, "run", model_file, merged_state(_tensors(model_file), scaling),
            _tensors(classifier) if classifier.is_file() else None,
            _labels(folder / "save" / "class_encoder.txt"),
            _labels(folder / "save" / "phrase_encoder.txt"),
        )  # fmt: skip
    raise SystemExit(
        f"error: init_from {folder}: neither a run's output folder ({RUN_RECORD} and save/ with "
        f"a checkpoint) nor a finished export ({EXPORT_FACTS})"
    )


def _tensors(path: Path) -> dict:
    """A state dict (tensors only: nothing of the file runs), its file named on failure."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: init_from: cannot read {path}: {error}") from error


def _labels(path: Path) -> list | None:
    """The labels of a SpeechBrain ``CategoricalEncoder`` file in index order; None if absent."""
    if not path.is_file():
        return None
    from speechbrain.dataio.encoder import CategoricalEncoder

    encoder = CategoricalEncoder()
    encoder.load(path)
    return _encoder_labels(encoder)


def check_fits(source: Source, model: torch.nn.Module) -> None:
    """Refuse a source whose WavLM, layer weights or speaker head differ from ``model``'s."""
    here = {plain_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for part, what in CORE_PARTS.items():
        ours = {k: s for k, s in here.items() if k.split(".")[0] == part and not is_adapter_key(k)}
        theirs = {k: tuple(v.shape) for k, v in source.model.items() if k.split(".")[0] == part}
        differ = [
            f"{key}: {_shape(theirs.get(key))} in the source, {_shape(ours.get(key))} here"
            for key in sorted({*theirs, *ours})
            if theirs.get(key) != ours.get(key)
        ]
        if part == "encoder":
            layers = _layer_count(theirs), _layer_count(ours)
            if layers[0] != layers[1]:
                differ.insert(0, f"{layers[0]} transformer layers in the source, {layers[1]} here")
        if differ:
            shown = "; ".join(differ[:3]) + (
                f"; and {len(differ) - 3} more" if len(differ) > 3 else ""
            )
            problems.append(f"{what} differs ({shown})")
    if problems:
        raise SystemExit(
            f"error: init_from {source.folder} does not fit this run's model:\n  "
            + "\n  ".join(problems)
            + "\nUse the source's wavlm_source, head_type and emb_dim (its hyperparams.yaml)"
        )


def _shape(shape) -> str:
    """A tensor shape in a message (``absent`` for none)."""
    return "absent" if shape is None else str(list(shape))


def _layer_count(shapes: dict) -> int:
    """How many transformer layers a WavLM state dict holds."""
    return len({k.split(".layers.")[1].split(".")[0] for k in shapes if ".layers." in k})


def load_source(source: Source, model, classifier, labels: dict) -> dict:
    """Load ``source`` into this run's ``model`` and speaker ``classifier``; what was loaded.

    ``labels``: this run's ``{"class": [...], "phrase": [...]}`` in output order. Returns the
    record (``INIT_RECORD``): the source, its digest, the parts loaded and those started fresh.
    """
    state = model.state_dict()
    same_phrases = source.phrase_labels == labels["phrase"]
    loaded, fresh = {}, set()
    for key, value in state.items():
        theirs = source.model.get(plain_name(key))
        part = key.split(".")[0]
        if key.startswith("phrase_branch.classifier") and not same_phrases:
            fresh.add("the phrase classifier (other phrases)")
        elif is_adapter_key(key):
            fresh.add("LoRA adapters (zero update)")
        elif theirs is None or theirs.shape != value.shape:
            fresh.add(f"{part} (not in the source)" if theirs is None else f"{part} (other shape)")
        else:
            loaded[key] = theirs
    model.load_state_dict(loaded, strict=False)
    parts = sorted({key.split(".")[0] for key in loaded})
    if source.classifier is not None and source.class_labels == labels["class"]:
        classifier.load_state_dict(source.classifier)
        parts.append("classifier")
    else:
        why = "the source has none" if source.classifier is None else "other classes"
        fresh.add(f"the speaker classifier ({why})")
    record = {
        "init_from": str(source.folder),
        "kind": source.kind,
        "model_file": str(source.model_file),
        "sha1": file_digest(source.model_file),
        "loaded": parts,
        "fresh": sorted(fresh),
    }
    logger.info(
        "init_from %s (%s): loaded %s; fresh: %s", source.folder, source.kind,
        ", ".join(parts), ", ".join(record["fresh"]) or "nothing",
    )  # fmt: skip
    return record


def check_unchanged(output_folder, source: Source, resuming: bool) -> None:
    """Refuse to resume a run whose source's model file changed since the run started."""
    path = Path(output_folder) / INIT_RECORD
    if not (resuming and path.is_file()):
        return
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("sha1") != file_digest(source.model_file):
        raise SystemExit(
            f"error: cannot resume the run in {output_folder}: its init_from {source.folder} "
            f"changed since it started ({source.model_file.name} differs from the one recorded "
            f"in {path}). Start a new run in another --output_folder"
        )


def write_record(output_folder, record: dict) -> None:
    """Write ``INIT_RECORD`` atomically (main process)."""
    if not if_main_process():
        return
    path = Path(output_folder) / INIT_RECORD
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(temporary, path)


def starting_model(init_from, build_model) -> Source | None:
    """The source of ``init_from`` (None: none), checked against the run's model before data prep.

    ``build_model()``: the run's model without its phrase branch (which the data sizes): its
    WavLM and head do not depend on the data (``experiment.data_free_model``).
    """
    if init_from is None:
        return None
    source = read_source(init_from)
    check_fits(source, build_model())
    return source


def start_from(source: Source, brain, data, output_folder) -> None:
    """Load ``source`` into the Brain's model and classifier (``load_source``); record it.

    Also on a resume, before its checkpoint is recovered: L2-SP's anchors are the source's.
    """
    resuming = brain.checkpointer.find_checkpoint() is not None
    check_unchanged(output_folder, source, resuming)
    labels = {"class": _encoder_labels(data.class_encoder), "phrase": data.phrase_labels}
    record = load_source(source, brain.model(), brain.unwrapped("classifier"), labels)
    if not (resuming and (Path(output_folder) / INIT_RECORD).is_file()):
        write_record(output_folder, record)


def _encoder_labels(encoder) -> list:
    """A ``CategoricalEncoder``'s labels in index order."""
    return [encoder.ind2lab[i] for i in range(len(encoder))]
