"""The DeepMine / SdSV / TdSV "task1" folder layout, shared by the preparer and the synthesizer.

Two releases of task 1 are in users' hands (docs/design.md section 3, after each evaluation plan):

SdSV 2020-21: one official list pair, five-column enrollment lines::

    docs/train_labels.txt        header, then "trn_000001 spk_000001 09"
    docs/model_enrollment.txt    header, then "model_00000 07 enr_007492 enr_023277 enr_012882"
    docs/trials.txt              header, then "model_00000 evl_000018"

TdSV 2024 (its evaluation plan v1.1, sections 2.5-2.7): a dev and an eval list pair, six-column
enrollment lines with a gender column (``m`` / ``f``)::

    docs/train_labels.txt
    docs/dev_model_enrollment.txt   header "model-id phrase-id gender enroll-file-id1 ... 3"
    docs/dev_trials.txt             then "dev_model_000001 05 m enr_036529 enr_036530 enr_036531"
    docs/eval_model_enrollment.txt
    docs/eval_trials.txt            header "model-id evaluation-file-id", then model and file

Audio of both: ``wav/{train,enrollment,evaluation}/<file-id>.wav`` (16 kHz mono). Neither
release ships trial keys; a key (``model-id evaluation-file-id target|nontarget TC|TW|IC|IW``)
is read from ``docs/<prefix>trials_key.txt`` where present (the synthetic SdSV corpus writes
``docs/trials_key.txt``) or from a file given per official split.

``find_release`` decides which release a folder holds from the lists present, and refuses a
folder that mixes them or holds half a list pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

#: Pass-phrases of the DeepMine text-dependent part: 01-05 Persian, 06-10 English.
PHRASES = {
    "01": "صدای من نشان دهنده هویت من است.",
    "02": "صدای هر کس منحصر به فرد است.",
    "03": "هویت من را با صدای من تایید کن.",
    "04": "صدای من رمز عبور من است.",
    "05": "بنی آدم اعضای یکدیگرند.",
    "06": "My voice is my password.",
    "07": "OK Google.",
    "08": "Artificial intelligence is for real.",
    "09": "Actions speak louder than words.",
    "10": "There is no such thing as a free lunch.",
}

#: The phrase id of a free-text line in the training list (no pass-phrase).
FREE_TEXT_ID = "FT"

#: The gender column's values in TdSV 2024's enrollment lines.
GENDERS = ("m", "f")

WAV_SUBDIRS = {"train": "train", "enrollment": "enrollment", "evaluation": "evaluation"}

TRAIN_LIST = "train_labels.txt"

#: Each release's official list pairs: ``{split: prefix}`` of ``<prefix>model_enrollment.txt``,
#: ``<prefix>trials.txt`` and the key ``<prefix>trials_key.txt``.
RELEASES = {
    "SdSV 2020-21": {"eval": ""},
    "TdSV 2024": {"dev": "dev_", "eval": "eval_"},
}


class OfficialLists(NamedTuple):
    """One official list pair of a release: a scored split of its own."""

    enrollment: Path
    trials: Path
    key: Path | None  # None: blind (scored, never reported)


class Release(NamedTuple):
    """Which release a task1 folder holds, and its official list pairs by split."""

    name: str  # a key of RELEASES, or "" for a folder without official lists
    splits: dict[str, OfficialLists]

    def describe(self) -> str:
        """One line for the log: the release and every list it reads."""
        if not self.splits:
            return "no official lists in docs/: only the validation split is scored"
        parts = []
        for split, lists in self.splits.items():
            key = f"key {lists.key}" if lists.key else "no key: scored blind"
            parts.append(f"{split}: {lists.enrollment.name} + {lists.trials.name} ({key})")
        return f"{self.name} layout; " + "; ".join(parts)


class LayoutError(ValueError):
    """The folder is not one task-1 release: the message names the files."""


def list_names(prefix: str) -> tuple[str, str]:
    """The enrollment and trial list names of one official pair."""
    return f"{prefix}model_enrollment.txt", f"{prefix}trials.txt"


def find_release(docs: Path, key_files: dict | None = None) -> Release:
    """The release whose lists ``docs`` holds, with a key per split where one is known.

    ``key_files``: ``{split: path}`` given by the user (a key the folder does not hold). A
    folder with lists of both releases, or half of a list pair, is refused naming the files; so
    is a key given for a split the folder does not have.
    """
    docs, key_files = Path(docs), {s: k for s, k in (key_files or {}).items() if k}
    found = {
        release: [
            p for prefix in pairs.values() for p in list_names(prefix) if (docs / p).is_file()
        ]
        for release, pairs in RELEASES.items()
    }
    present = [release for release, names in found.items() if names]
    if len(present) > 1:
        listed = "; ".join(f"{r}: {', '.join(found[r])}" for r in present)
        raise LayoutError(
            f"{docs} holds the lists of two releases ({listed}): keep one release's lists "
            "(SdSV 2020-21: model_enrollment.txt + trials.txt; TdSV 2024: dev_* and eval_* "
            "pairs)"
        )
    name = present[0] if present else ""
    splits = {}
    for split, prefix in RELEASES.get(name, {}).items():
        enrollment, trials = (docs / n for n in list_names(prefix))
        if enrollment.is_file() != trials.is_file():
            have, lack = (enrollment, trials) if enrollment.is_file() else (trials, enrollment)
            raise LayoutError(f"{have} has no {lack.name} beside it: a list pair is both files")
        if enrollment.is_file():
            in_docs = docs / f"{prefix}trials_key.txt"  # a missing one: no key, scored blind
            key = Path(key_files[split]) if split in key_files else in_docs
            splits[split] = OfficialLists(enrollment, trials, key if key.is_file() else None)
    for split, key in key_files.items():
        if split not in splits:
            raise LayoutError(f"{split}_key_file {key}: {docs} has no {split} list pair to key")
        if not Path(key).is_file():
            raise LayoutError(f"{split}_key_file {key} not found")
    return Release(name, splits)


def phrase_language(phrase_id: str) -> str:
    """Language of a pass-phrase id: 'persian' (01-05), 'english' (06-10), else 'free'."""
    if phrase_id in PHRASES:
        return "persian" if int(phrase_id) <= 5 else "english"
    return "free"


def wav_path(root: Path, subdir: str, file_id: str) -> Path:
    """Path of one utterance in the layout; ``subdir`` is train, enrollment or evaluation."""
    return Path(root) / "wav" / WAV_SUBDIRS[subdir] / f"{file_id}.wav"
