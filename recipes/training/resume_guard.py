"""What a run's checkpoints depend on, recorded when it starts and compared when it resumes.

Rerunning a training command resumes from the last checkpoint, with whatever settings and data
the new command has. Some differences are fine (more epochs, another number of loader workers, a
learning rate lowered by hand); others make the checkpoint meaningless or unloadable: another
head or embedding size, other training classes, another validation split, another corpus with
the same speaker ids. So the first start writes ``save/run_fingerprint.json``: the settings that
shape the model, its classes, the data and the validation EER that picks the best checkpoint
(``SHAPING``), a hash of each manifest data prep wrote, and the identity of the audio they list
(a hash of the samples, data prep's ``audio_record``: the same after a copy or a move of the
corpus). A resume with a difference there is refused before any heavy work, naming each one and
how to start fresh; other changed settings are logged. The settings are compared before
anything of the run is written (``guard_settings``), the data after data prep (``guard_data``),
which then records a new run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from speechbrain.utils.distributed import ddp_barrier, if_main_process
from speechbrain.utils.logger import get_logger

from data_prep.corpus import file_digest
from data_prep.manifests import PREP_RECORD

logger = get_logger(__name__)

#: The YAML's wiring: objects HyperPyYAML builds from the checked keys (they check their own).
WIRING = (
    "train_dataloader_options", "eval_dataloader_options", "wavlm", "wavlm_hidden_size", "heads",
    "embedding_head", "embedding_model", "classifier", "loss", "phrase_branch_model",
    "add_noise", "speed_perturb", "drop_freq", "drop_chunk", "wav_augment", "wavlm_opt_class",
    "head_opt_class",
    "lr_schedulers", "epoch_counter", "train_logger", "tensorboard_logger", "checkpointer",
    "recipe_settings",
)  # fmt: skip

#: The record, in the run's save folder beside its checkpoints.
FINGERPRINT_FILE = "run_fingerprint.json"

#: Settings a checkpoint depends on: the model's shape and classes, the data and its validation
#: split, the position in an epoch (batches), and what the best checkpoint is chosen by.
SHAPING = (
    "corpus", "phrase_min_count", "wavlm_source", "sample_rate", "freeze_cnn", "head_type",
    "emb_dim", "phrase_branch", "target_type", "margin_type", "scale_mode", "seed",
    "valid_speakers", "valid_enrol_utts",
    "include_free_text", "skip_bad", "enrol_utts", "min_audio_seconds", "synthetic_corpus",
    "batch_size", "grad_accumulation_factor", "batch_sampler", "fusion", "fusion_prior",
    "max_eval_seconds", "init_from", "wavlm_tuning", "lora_rank", "lora_alpha", "lora_targets",
)  # fmt: skip
#: What data prep wrote that training reads (``$data_root`` in place of the corpus folder, so a
#: moved corpus is the same data).
MANIFESTS = (
    "train.csv", "valid_enrol.csv", "valid_enrol_utts.csv", "valid_test.csv", "valid_trials.csv",
)  # fmt: skip


def fingerprint(settings: dict, prep_folder=None) -> dict:
    """The run's record: every setting as given, a hash of each manifest, the audio's identity.

    Settings as plain values; the audio's identity is the hash of its samples that data prep
    recorded.
    """
    prep = Path(prep_folder) if prep_folder is not None else None
    hashes, audio = {}, None
    if prep is not None:
        hashes = {name: file_digest(prep / name) for name in MANIFESTS if (prep / name).is_file()}
        audio = _audio_identity(prep / PREP_RECORD)
    return {"settings": _plain(settings), "manifests": hashes, "audio": audio}


def _audio_identity(record: Path) -> str | None:
    """The hash of the samples of every listed file, from data prep's record (None: absent)."""
    try:
        return json.loads(record.read_text())["audio"]["content"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def guard_settings(save_folder, settings: dict) -> None:
    """Refuse to resume when a setting the checkpoints depend on changed; log the others.

    Called before anything of the run is written (its ``hyperparams.yaml`` included), with the
    YAML's plain settings, the command line applied.
    """
    _refuse_or_log(Path(save_folder), fingerprint(settings), compare_data=False)


def guard_data(save_folder, settings: dict, prep_folder) -> None:
    """After data prep: refuse to resume on other data; record the run when it has nothing yet.

    A run without a checkpoint (new, or stopped before its first) records its settings and
    manifests; so does one whose checkpoints predate the record. Collective under ``torchrun``:
    the main process writes the record.
    """
    save = Path(save_folder)
    current = fingerprint(settings, prep_folder)
    compared = _refuse_or_log(save, current, compare_data=True, log_changes=False)
    if if_main_process() and not compared:
        save.mkdir(parents=True, exist_ok=True)
        record = save / FINGERPRINT_FILE
        temporary = record.with_name(f".{record.name}.tmp")
        temporary.write_text(json.dumps(current, indent=1, sort_keys=True))
        os.replace(temporary, record)
    ddp_barrier()


def _refuse_or_log(save: Path, current: dict, compare_data: bool, log_changes=True) -> bool:
    """Compare ``current`` with the record of a run that has checkpoints; whether it did."""
    record = save / FINGERPRINT_FILE
    if not (any(save.glob("CKPT+*/CKPT.yaml")) and record.is_file()):
        return False
    refused, changed = differences(json.loads(record.read_text()), current, compare_data)
    if refused:
        raise SystemExit(
            f"error: cannot resume the run in {save}: its checkpoints were made with\n  "
            + "\n  ".join(refused)
            + "\nRerun with the run's own settings (and data) to resume it, or start a new run "
            "in another --output_folder. The checkpoints are not damaged: keep them."
        )
    for line in changed if log_changes else ():
        logger.warning("resuming with a changed setting: %s", line)
    return True


def differences(recorded: dict, current: dict, compare_data: bool = True):
    """``(refused, changed)``: lines naming each difference that forbids a resume, and the rest.

    Plain settings are compared (the YAML's wiring follows from them; ``__`` keys are built for
    their effect), and with ``compare_data`` the manifests.
    """
    refused, changed = [], []
    old, new = recorded.get("settings", {}), current["settings"]
    for key in sorted(set(old) | set(new)):
        if key in WIRING or key.startswith("__") or old.get(key) == new.get(key):
            continue
        line = f"{key}: {old.get(key)!r} (now {new.get(key)!r})"
        (refused if key in SHAPING else changed).append(line)
    manifests = (recorded.get("manifests", {}), current["manifests"]) if compare_data else ({}, {})
    for name in sorted(set(manifests[0]) | set(manifests[1])):
        if manifests[0].get(name) != manifests[1].get(name):
            refused.append(f"{name}: other data (the manifest that data prep wrote differs)")
    audio = (recorded.get("audio"), current.get("audio")) if compare_data else (None, None)
    if None not in audio and audio[0] != audio[1]:  # records before it was kept: not compared
        refused.append("audio: other audio (the listed files hold other samples)")
    return refused, changed


def _plain(settings: dict) -> dict:
    """``settings`` as JSON values (what YAML gives: numbers, strings, lists, mappings)."""
    return json.loads(json.dumps(settings, default=str))
