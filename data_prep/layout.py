"""The DeepMine / SdSV / TdSV "task1" folder layout, shared by the preparer and the synthesizer.

Facts from the SdSV 2020-21 evaluation plan and the TdSV 2024 release (docs/design.md section 3):

    docs/train_labels.txt       header, then "trn_000001 spk_000001 09"
    docs/model_enrollment.txt   header, then "model_00000 07 enr_007492 enr_023277 enr_012882"
    docs/trials.txt             header, then "model_00000 evl_000018"
    wav/{train,enrollment,evaluation}/<file-id>.wav   (16 kHz mono)

TdSV 2024 names the lists ``dev_model_enrollment.txt`` / ``dev_trials.txt``. The synthetic corpus
adds ``docs/trials_key.txt`` ("model-id evaluation-file-id target|nontarget TC|TW|IC|IW").
"""

from __future__ import annotations

from pathlib import Path

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


WAV_SUBDIRS = {"train": "train", "enrollment": "enrollment", "evaluation": "evaluation"}

ENROLLMENT_LISTS = ("model_enrollment.txt", "dev_model_enrollment.txt")
TRIAL_LISTS = ("trials.txt", "dev_trials.txt")
KEY_LISTS = ("trials_key.txt", "dev_trials_key.txt")


def phrase_language(phrase_id: str) -> str:
    """Language of a pass-phrase id: 'persian' (01-05), 'english' (06-10), else 'free'."""
    if phrase_id in PHRASES:
        return "persian" if int(phrase_id) <= 5 else "english"
    return "free"


def wav_path(root: Path, subdir: str, file_id: str) -> Path:
    """Path of one utterance in the layout; ``subdir`` is train, enrollment or evaluation."""
    return Path(root) / "wav" / WAV_SUBDIRS[subdir] / f"{file_id}.wav"


def find_list(docs: Path, names: tuple[str, ...]) -> Path | None:
    """The first existing file among the accepted names of one list (SdSV or TdSV 2024 naming)."""
    for name in names:
        if (docs / name).is_file():
            return docs / name
    return None
