"""Turn a DeepMine / SdSV / TdSV "task1" folder into SpeechBrain CSV manifests and labelled trials.

Writes to ``save_folder`` (docs/design.md section 3):

    train.csv              utterances of the training speakers (dev speakers held out)
    dev_enrol.csv          enrollment models of the held-out speakers (3 utterances each)
    dev_enrol_utts.csv     the utterances those models are made of
    dev_test.csv           the held-out test utterances
    dev_trials.csv         every dev model against every dev test utterance, labelled TC/TW/IC/IW
    eval_enrol.csv, eval_enrol_utts.csv, eval_test.csv, eval_trials.csv
                           the official lists (labels only where a key file is present)
    train_noise.csv        the training utterances in SpeechBrain's extended CSV format
                           (ID,duration,wav,wav_format,wav_opts), for ``AddNoise``: babble
                           made of other training speakers
    rejected.csv           with ``skip_bad``: each excluded file or line and why
    prep_options.json      the options the manifests were made with (to skip a redo)

Utterance manifests have the columns ``ID,duration,wav,spk_id,phrase_id,phrase,language``, with
``wav`` written as ``$data_root/wav/...`` (pass ``replacements={"data_root": data_folder}`` to
``DynamicItemDataset.from_csv``). Models are ``model_id,phrase_id,spk_id,enrol_ids`` (ids joined by
a space); trials are ``model_id,test_id,label,condition``.

Everything is validated before anything is written: each referenced wav must exist, be readable,
mono, 16 kHz, whole (as long as its header says), at least ``min_seconds`` long, finite and not
silent (``data_prep/audio_checks.py``); each list line has its exact fields, each phrase id is a
pass-phrase (or the free-text id in the training list), each model has ``enrol_utts`` utterances
of its own, each key label agrees with its trial type, each id is known and none is repeated. One
error names every problem (file and line); nothing partial is written. A lock on ``save_folder``
makes concurrent runs take turns.

Usage::

    python data_prep/deepmine_prepare.py --data_folder /data/TdSV2024/task1 --save_folder prep
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import json
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.audio_checks import MIN_SECONDS, file_problem
from data_prep.layout import (
    ENROLLMENT_LISTS,
    FREE_TEXT_ID,
    KEY_LISTS,
    PHRASES,
    SAMPLE_RATE,
    TRIAL_LISTS,
    ListLine,
    condition_of,
    file_digest,
    find_list,
    phrase_language,
    read_list,
    wav_path,
)

UTT_FIELDS = ["ID", "duration", "wav", "spk_id", "phrase_id", "phrase", "language"]
MODEL_FIELDS = ["model_id", "phrase_id", "spk_id", "enrol_ids"]
TRIAL_FIELDS = ["model_id", "test_id", "label", "condition"]
NOISE_FIELDS = ["ID", "duration", "wav", "wav_format", "wav_opts"]
PREP_VERSION = 4  # bump when the manifests change, so existing ones are redone
ENROL_UTTS = 3  # enrollment utterances per model, as in the challenge (0: any number)
MAX_REPORTED = 50  # problems listed in one error message (all go to rejected.csv with skip_bad)


class DataPrepError(ValueError):
    """The corpus folder has problems; the message lists each with its file and line."""


@dataclass
class Utt:
    """One utterance: id, where it is, and what we know about it."""

    file_id: str
    subdir: str
    where: str  # the docs line that names it
    spk_id: str = ""
    phrase_id: str = ""
    duration: float = 0.0
    digest: str = ""  # of its samples (``audio_checks.FileCheck``), once checked

    @property
    def manifest_wav(self) -> str:
        """Its ``wav`` column in a manifest: the path under ``$data_root``."""
        return wav_path(Path("$data_root"), self.subdir, self.file_id).as_posix()


@dataclass
class Problems:
    """Problems found while reading the corpus: ``(item, where, reason)`` triples."""

    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, item: str, where: str, reason: str) -> None:
        """Record one problem."""
        self.items.append((item, where, reason))

    def message(self) -> str:
        """A readable summary naming up to ``MAX_REPORTED`` problems."""
        lines = [
            f"  {where}: {item}: {reason}" for item, where, reason in self.items[:MAX_REPORTED]
        ]
        if len(self.items) > MAX_REPORTED:
            lines.append(f"  ... and {len(self.items) - MAX_REPORTED} more")
        return (
            f"{len(self.items)} problem(s) in the corpus; nothing was written. Fix them, or run "
            "with --skip_bad to exclude them (listed in rejected.csv):\n" + "\n".join(lines)
        )


# --------------------------------------------------------------------------------------------
# Reading the docs lists
# --------------------------------------------------------------------------------------------
def _expect_fields(
    line: ListLine, count: int, problems: Problems, at_least=False, fields: str = ""
) -> bool:
    """Check the number of fields of a list line; record a problem if it is wrong."""
    ok = len(line.fields) >= count if at_least else len(line.fields) == count
    if not ok:
        expected = f"{'at least ' if at_least else ''}{count} fields{fields}"
        problems.add(" ".join(line.fields), line.where, f"expected {expected}")
    return ok


def _first_occurrence(key, seen: dict, line: ListLine, problems: Problems) -> bool:
    """False (and a problem) if ``key`` was already defined on an earlier line."""
    if key in seen:
        problems.add(key, line.where, f"duplicate id (first at {seen[key].where})")
        return False
    seen[key] = line  # its place is formatted only for a message: 10M lines in a trial list
    return True


def _known_phrase(phrase_id: str, line: ListLine, problems: Problems, free_text_id=None) -> bool:
    """False (and a problem) unless ``phrase_id`` is a pass-phrase (or ``free_text_id``)."""
    if phrase_id in PHRASES or phrase_id == free_text_id:
        return True
    allowed = f"pass-phrases {min(PHRASES)}-{max(PHRASES)}"
    allowed += f" or {free_text_id!r} (free text)" if free_text_id else ""
    problems.add(phrase_id, line.where, f"unknown phrase id (expected {allowed})")
    return False


def read_train_labels(
    path: Path, include_free_text: bool, problems: Problems, free_text_id: str = FREE_TEXT_ID
) -> list[Utt]:
    """Training utterances with speaker and phrase; free text kept only if asked.

    A phrase id that is neither a pass-phrase nor ``free_text_id`` is an error (a mistyped ``1``
    or ``O1`` would otherwise be dropped, or trained, as free text without a word).
    """
    utts, seen = [], {}
    for line in read_list(path):
        if not _expect_fields(line, 3, problems) or not _first_occurrence(
            line.fields[0], seen, line, problems
        ):
            continue
        file_id, spk_id, phrase_id = line.fields
        if not _known_phrase(phrase_id, line, problems, free_text_id):
            continue
        if phrase_id in PHRASES or include_free_text:
            utts.append(Utt(file_id, "train", line.where, spk_id, phrase_id))
    return utts


def read_enrollment(path: Path, problems: Problems, enrol_utts: int = ENROL_UTTS):
    """Models ``{model_id: (phrase_id, [enrollment file ids], where)}`` and their utterances.

    Each model has exactly ``enrol_utts`` utterances (0: any number, at least one), says a
    pass-phrase, and no utterance belongs to two models.
    """
    models, utts, seen_models, owner = {}, {}, {}, {}
    for line in read_list(path):
        count = f"{enrol_utts} enrollment utterance(s)" if enrol_utts else "any enrollment"
        fields = f" (model id, phrase id, {count}; see enrol_utts)"
        ok = _expect_fields(line, 2 + max(enrol_utts, 1), problems, not enrol_utts, fields)
        if not ok or not _first_occurrence(line.fields[0], seen_models, line, problems):
            continue
        model_id, phrase_id, *enrol_ids = line.fields
        if not _known_phrase(phrase_id, line, problems):
            continue
        shared = [f for f in enrol_ids if f in owner]
        for file_id in shared:
            problems.add(file_id, line.where, f"utterance already enrolled in {owner[file_id]}")
        if shared:
            continue
        owner.update({f: f"{model_id} ({line.where})" for f in enrol_ids})
        models[model_id] = (phrase_id, enrol_ids, line.where)
        for file_id in enrol_ids:
            utts[file_id] = Utt(file_id, "enrollment", line.where, "", phrase_id)
    return models, utts


def read_trials(path: Path, models: dict, problems: Problems):
    """Trials ``[(model_id, test_id, ListLine)]`` and the test utterances they name."""
    trials, utts, seen = [], {}, {}
    for line in read_list(path):
        if not _expect_fields(line, 2, problems):
            continue
        model_id, test_id = line.fields
        if model_id not in models:
            problems.add(model_id, line.where, "unknown model id (not in the enrollment list)")
            continue
        if not _first_occurrence(f"{model_id} {test_id}", seen, line, problems):
            continue
        trials.append((model_id, test_id, line))
        if test_id not in utts:
            utts[test_id] = Utt(test_id, "evaluation", line.where)
    return trials, utts


def read_key(path: Path, trials: list, problems: Problems) -> dict[tuple[str, str], str]:
    """Trial conditions from a key file (``model test target|nontarget TC|TW|IC|IW``).

    The target label must agree with the trial type (target exactly for TC).
    """
    known = {(m, t) for m, t, _ in trials}
    key, seen, named = {}, {}, set()
    for line in read_list(path):
        named.add(line.fields[:2])  # a bad line is one problem, not also a trial without entry
        if not _expect_fields(line, 4, problems):
            continue
        model_id, test_id, label, condition = line.fields
        pair = (model_id, test_id)
        if condition not in ("TC", "TW", "IC", "IW"):
            problems.add(" ".join(line.fields), line.where, "trial type must be TC, TW, IC or IW")
        elif label not in ("target", "nontarget"):
            problems.add(label, line.where, "target type must be target or nontarget")
        elif (label == "target") != (condition == "TC"):
            problems.add(
                f"{label} {condition}", line.where, "target type contradicts the trial type"
            )
        elif pair not in known:
            problems.add(" ".join(pair), line.where, "key names a trial that is not in the trials")
        elif _first_occurrence(" ".join(pair), seen, line, problems):
            key[pair] = condition
    for model_id, test_id, line in trials:
        if (model_id, test_id) not in named:
            problems.add(f"{model_id} {test_id}", line.where, f"trial has no entry in {path}")
    return key


def read_trial_lists(trial_list: Path, key_list, models: dict, problems: Problems):
    """Trials (``model_id``, ``test_id``, ``condition``: "" without a key) and their tests.

    A well-formed pair of lists (the usual case) is read and checked column-wise by pandas: 10M
    trials in seconds, where reading them line by line took minutes
    (``tests/benchmarks/bench_scale.py``). Any irregular line sends both lists through the
    line-by-line readers, whose messages name each bad line.
    """
    fast = _well_formed_trials(trial_list, key_list, models)
    if fast is not None:
        return fast
    trials, test_utts = read_trials(trial_list, models, problems)
    key = read_key(key_list, trials, problems) if key_list else {}
    frame = pd.DataFrame([t[:2] for t in trials], columns=["model_id", "test_id"], dtype=str)
    frame["condition"] = [key.get(t[:2], "") for t in trials]
    return frame, test_utts


def _list_columns(path: Path, names: list[str]):
    """``(columns, header lines)`` of a list whose lines all have exactly the fields ``names``.

    Single-space separated; None when any line does not fit (a blank line included).
    """
    try:
        frame = pd.read_csv(
            path, sep=" ", header=None, names=[*names, "_extra"], dtype=str, quoting=csv.QUOTE_NONE,
            encoding="utf-8-sig", keep_default_na=False, skip_blank_lines=False, engine="c",
        )  # fmt: skip
    except (pd.errors.ParserError, UnicodeDecodeError):
        return None
    header = int(len(frame) > 0 and str(frame.iat[0, 0]).lower().endswith("-id"))
    frame = frame.iloc[header:]
    columns = frame[names]
    if columns.isna().any(axis=None) or (columns == "").any(axis=None):
        return None
    if frame["_extra"].notna().any() and (frame["_extra"].fillna("") != "").any():
        return None
    return columns.reset_index(drop=True), header


def _well_formed_trials(trial_list: Path, key_list, models: dict):
    """``read_trial_lists``'s result when both lists pass every check column-wise, else None."""
    read = _list_columns(trial_list, ["model_id", "test_id"])
    if read is None:
        return None
    trials, header = read
    if not trials["model_id"].isin(models).all() or trials.duplicated().any():
        return None
    trials["condition"] = ""
    if key_list:
        read = _list_columns(key_list, ["model_id", "test_id", "label", "condition"])
        if read is None:
            return None
        key = read[0]
        if (
            not key["condition"].isin(["TC", "TW", "IC", "IW"]).all()
            or not ((key["label"] == "target") == (key["condition"] == "TC")).all()
            or not key["label"].isin(["target", "nontarget"]).all()
            or len(key) != len(trials)
            or key[["model_id", "test_id"]].duplicated().any()
        ):
            return None
        merged = trials[["model_id", "test_id"]].merge(key, how="left", on=["model_id", "test_id"])
        if merged["condition"].isna().any():
            return None
        trials["condition"] = merged["condition"].to_numpy()
    first = trials.index[~trials["test_id"].duplicated()]
    test_ids = trials["test_id"].to_numpy()
    test_utts = {
        test_ids[i]: Utt(test_ids[i], "evaluation", f"{trial_list}:{i + 1 + header}") for i in first
    }
    return trials, test_utts


# --------------------------------------------------------------------------------------------
# Audio validation
# --------------------------------------------------------------------------------------------
#: The longest file name most file systems take (bytes), ``.wav`` included.
MAX_FILE_NAME = 255


def unsafe_id(file_id: str) -> str | None:
    """Why an utterance id cannot name a file under the corpus folder; None when it can.

    An id is joined into ``wav/<subdir>/<id>.wav``: a path separator, ``..`` or an absolute path
    would read (and train on) files outside the data folder; a NUL or an over-long name fails
    inside a thread pool with a message that names no list line.
    """
    if "/" in file_id or "\\" in file_id:
        return "an utterance id is a file name: no path separators"
    if ".." in file_id:
        return "an utterance id is a file name: no '..'"
    if "\0" in file_id or not file_id.isprintable():
        return "an utterance id is a file name: no NUL or control characters"
    size = len(f"{file_id}.wav".encode())
    if size > MAX_FILE_NAME:
        return f"too long for a file name ({size} bytes with .wav; the limit is {MAX_FILE_NAME})"
    return None


def check_audio(
    root: Path, utts: list[Utt], problems: Problems, jobs: int, min_seconds: float = MIN_SECONDS
) -> set[str]:
    """Fill in durations in parallel; return the ids of unusable files (each also a problem).

    Every sample is read (``audio_checks.file_problem``): a truncated, silent or non-finite file
    is named here, not after hours of training or as a perfect score.
    """
    bad = set()
    for utt in utts:  # an id becomes a file name: refused before any path is made of it
        reason = unsafe_id(utt.file_id)
        if reason:
            problems.add(repr(utt.file_id), utt.where, reason)
            bad.add(utt.file_id)
    utts = [u for u in utts if u.file_id not in bad]
    paths = [wav_path(root, u.subdir, u.file_id) for u in utts]
    check = partial(file_problem, sample_rate=SAMPLE_RATE, min_seconds=min_seconds)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # libsndfile releases the GIL
        results = list(pool.map(check, paths, chunksize=64))
    for utt, path, (duration, reason, digest) in zip(utts, paths, results, strict=True):
        utt.duration, utt.digest = duration, digest
        if reason:
            problems.add(str(path), utt.where, reason)
            bad.add(utt.file_id)
    return bad


# --------------------------------------------------------------------------------------------
# Dev split and trials
# --------------------------------------------------------------------------------------------
def split_dev(train: list[Utt], dev_speakers: int, seed: int):
    """Hold out whole speakers: returns (train utts, dev models, dev enrol utts, dev test utts).

    Each held-out (speaker, pass-phrase) with at least 4 utterances gives one model of 3 random
    enrollment utterances; all other utterances of held-out speakers are test utterances.
    """
    speakers = sorted({u.spk_id for u in train})
    if dev_speakers >= len(speakers):
        raise DataPrepError(
            f"dev_speakers={dev_speakers} but the training list has only {len(speakers)} speakers"
        )
    rng = np.random.default_rng(seed)
    held_out = set(rng.choice(speakers, dev_speakers, replace=False).tolist())
    groups = defaultdict(list)
    for utt in train:
        if utt.spk_id in held_out:
            groups[(utt.spk_id, utt.phrase_id)].append(utt)
    models, enrol, test = [], [], []
    for (spk_id, phrase_id), utts in sorted(groups.items()):
        order = [utts[i] for i in rng.permutation(len(utts))]
        if phrase_id in PHRASES and len(order) >= 4:
            model_id = f"dev_{spk_id}_{phrase_id}"
            models.append((model_id, phrase_id, spk_id, [u.file_id for u in order[:3]]))
            enrol += order[:3]
            order = order[3:]
        test += order
    return [u for u in train if u.spk_id not in held_out], models, enrol, test


def dev_trials(models, test: list[Utt]) -> list[tuple[str, str, int, str]]:
    """Every dev model against every dev test utterance, labelled.

    Free-text test utterances (kept with ``include_free_text``) give wrong-phrase trials (TW with
    their speaker's models, IW with the others'), as in TdSV 2024's evaluation: the fusion then
    learns on dev to reject sentences that are no pass-phrase.
    """
    trials = []
    tests = list(test)
    for model_id, phrase_id, spk_id, _ in models:
        for utt in tests:
            condition = condition_of(utt.spk_id == spk_id, utt.phrase_id == phrase_id)
            trials.append((model_id, utt.file_id, int(condition == "TC"), condition))
    return trials


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _utt_rows(utts: list[Utt]) -> list[list]:
    """Manifest rows for utterances (speaker/phrase blank where unknown, as for eval data)."""
    rows = []
    for u in utts:
        relative = u.manifest_wav
        language = phrase_language(u.phrase_id) if u.phrase_id else ""
        rows.append(
            [
                u.file_id,
                f"{u.duration:.3f}",
                relative,
                u.spk_id,
                u.phrase_id,
                PHRASES.get(u.phrase_id, ""),
                language,
            ]
        )
    return rows


def _up_to_date(marker: Path, fingerprint: dict) -> bool:
    """Whether the manifests beside ``marker`` were made from ``fingerprint`` and are as written.

    A deleted, truncated or edited manifest, or a damaged marker, means preparing again (with a
    line saying why), never skipping: a missing ``eval_trials.csv`` would leave no eval reports.
    """
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError):
        print(f"{marker} is damaged: preparing again.")
        return False
    if not isinstance(record, dict) or record.get("options") != fingerprint:
        return False
    changed = [
        name for name, digest in record.get("manifests", {}).items()
        if not (marker.parent / name).is_file() or file_digest(marker.parent / name) != digest
    ]  # fmt: skip
    if changed:
        print(
            f"Manifests missing or changed since written ({', '.join(changed)}): preparing again."
        )
        return False
    audio = record.get("audio") or {}
    wavs = listed_audio(marker.parent)
    if audio.get("stat") != audio_stamp(fingerprint["data_folder"], wavs):
        print(
            f"Audio changed since data prep (the size or time of one of the {len(wavs)} listed "
            "files, or one is missing): preparing again."
        )
        return False
    return True


#: The manifests that list audio files (``wav`` column): what the audio record covers.
UTTERANCE_MANIFESTS = (
    "train.csv", "dev_enrol_utts.csv", "dev_test.csv", "eval_enrol_utts.csv", "eval_test.csv",
)  # fmt: skip


def listed_audio(save_folder: Path) -> list[str]:
    """The ``wav`` column (``$data_root/...``) of every utterance manifest in ``save_folder``."""
    wavs = set()
    for name in UTTERANCE_MANIFESTS:
        if (Path(save_folder) / name).is_file():
            with open(Path(save_folder) / name, newline="", encoding="utf-8") as handle:
                wavs.update(row["wav"] for row in csv.DictReader(handle))
    return sorted(wavs)


def audio_stamp(data_folder, wavs: list[str]) -> str:
    """A hash of each listed file's size and modification time (cheap: one ``stat`` each).

    What tells a rerun, without reading the audio, that a file was replaced since data prep.
    """
    digest = hashlib.sha1()
    for wav in wavs:
        try:
            stat = os.stat(wav.replace("$data_root", str(data_folder), 1))
            digest.update(f"{wav} {stat.st_size} {stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{wav} missing\n".encode())
    return digest.hexdigest()


def audio_record(data_folder: Path, utts: list[Utt], tables: dict) -> dict:
    """What the manifests' audio is: the files, a hash of their samples, and of their stats.

    ``content`` (the samples of every listed file, as data prep read them) is the audio's
    identity: the same whatever the folder, copy or file times. A run's resume guard compares
    it (``recipes/training/resume_guard.py``). ``stat`` tells a rerun to prepare again.
    """
    listed = sorted({row[2] for n in UTTERANCE_MANIFESTS if n in tables for row in tables[n][1]})
    digests = {u.manifest_wav: u.digest for u in utts}
    content = hashlib.sha1("".join(f"{w} {digests[w]}\n" for w in listed).encode())
    stamp = audio_stamp(data_folder.resolve(), listed)
    return {"files": len(listed), "content": content.hexdigest(), "stat": stamp}


def _write_all(
    save_folder: Path,
    tables: dict[str, tuple[list[str], list[list]]],
    marker: str,
    options: dict,
    audio: dict,
) -> None:
    """Write every CSV under a temporary name, then rename them all: never a partial set.

    The ``marker`` file (the ``options``, a hash of each manifest and the ``audio_record``) is
    written last;
    manifests of an earlier run that this one does not make (say ``rejected.csv``) are removed.
    On any failure the temporary files go and the folder keeps the previous run's complete set.
    """
    save_folder.mkdir(parents=True, exist_ok=True)
    temporary = []
    try:
        for name, (header, rows) in tables.items():
            tmp = save_folder / f".{name}.{os.getpid()}.tmp"
            temporary.append((tmp, save_folder / name))
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(header)
                if isinstance(rows, pd.DataFrame):
                    rows.to_csv(handle, header=False, index=False, lineterminator="\r\n")
                else:
                    writer.writerows(rows)
        digests = {final.name: file_digest(tmp) for tmp, final in temporary}
        name = marker
        tmp = save_folder / f".{name}.{os.getpid()}.tmp"
        temporary.append((tmp, save_folder / name))
        record = {"options": options, "manifests": digests, "audio": audio}
        tmp.write_text(json.dumps(record, indent=1))
    except BaseException:
        for tmp, _ in temporary:
            tmp.unlink(missing_ok=True)
        raise
    (save_folder / name).unlink(missing_ok=True)  # no marker while the set is being replaced
    for stale in set(save_folder.glob("*.csv")) - {save_folder / n for n in tables}:
        stale.unlink()
    for tmp, final in temporary:
        os.replace(tmp, final)


@contextmanager
def folder_lock(save_folder: Path):
    """Hold an exclusive lock on ``save_folder`` (a second data prep waits, and says so).

    The lock is on the folder itself (``flock`` of its descriptor): no lock file is left behind.
    """
    save_folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(save_folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another data prep writing to {save_folder} to finish...")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _options_fingerprint(data_folder: Path, docs_files: list[Path], options: dict) -> dict:
    """Options plus the size and time of each docs list, to know when a redo is needed."""
    stamp = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in docs_files}
    return {
        "version": PREP_VERSION,
        "data_folder": str(data_folder.resolve()),
        "docs": stamp,
        **options,
    }


def prepare_deepmine(
    data_folder,
    save_folder,
    dev_speakers: int = 20,
    seed: int = 1234,
    include_free_text: bool = False,
    skip_bad: bool = False,
    key_file=None,
    jobs: int | None = None,
    enrol_utts: int = ENROL_UTTS,
    min_seconds: float = MIN_SECONDS,
    free_text_id: str = FREE_TEXT_ID,
) -> dict[str, Path]:
    """Validate the corpus in ``data_folder`` and write the manifests to ``save_folder``.

    Returns the paths of the written CSVs by name (``train``, ``dev_trials``, ...). Raises
    ``DataPrepError`` naming each problem, unless ``skip_bad`` (then they go to rejected.csv).
    Does nothing if the manifests exist and were made from the same lists with the same options.
    Holds a lock on ``save_folder`` meanwhile: concurrent runs take turns. ``jobs`` threads read
    the audio (default: one per CPU core; more pay off only on network storage).
    """
    jobs = jobs or min(16, os.cpu_count() or 1)
    data_folder, save_folder = Path(data_folder), Path(save_folder)
    docs = data_folder / "docs"
    train_list = docs / "train_labels.txt"
    if not train_list.is_file():
        raise DataPrepError(f"{train_list} not found: is {data_folder} a DeepMine task1 folder?")
    enrol_list, trial_list = find_list(docs, ENROLLMENT_LISTS), find_list(docs, TRIAL_LISTS)
    key_list = Path(key_file) if key_file else find_list(docs, KEY_LISTS)
    docs_files = [p for p in (train_list, enrol_list, trial_list, key_list) if p]
    options = dict(
        dev_speakers=dev_speakers, seed=seed, include_free_text=include_free_text,
        skip_bad=skip_bad, enrol_utts=enrol_utts, min_seconds=min_seconds,
        free_text_id=free_text_id,
    )  # fmt: skip
    with folder_lock(save_folder):
        fingerprint = _options_fingerprint(data_folder, docs_files, options)
        marker = save_folder / "prep_options.json"
        if _up_to_date(marker, fingerprint):
            print(
                f"Manifests in {save_folder} are up to date (same lists, options, and each "
                "manifest as written): skipping data prep."
            )
            return {p.stem: p for p in save_folder.glob("*.csv")}
        lists = (train_list, enrol_list, trial_list, key_list)
        tables, problems, audio = _manifest_tables(data_folder, lists, options, jobs)
        _write_all(save_folder, tables, marker.name, fingerprint, audio)
    _print_summary(save_folder, tables, problems)
    return {Path(name).stem: save_folder / name for name in tables}


def _manifest_tables(data_folder: Path, lists, options: dict, jobs: int):
    """Read and check the lists and the audio.

    Returns the manifest tables by file name, the problems and the ``audio_record``.
    """
    train_list, enrol_list, trial_list, key_list = lists
    problems = Problems()
    train = read_train_labels(
        train_list, options["include_free_text"], problems, options["free_text_id"]
    )
    models, enrol_utts, trials, test_utts = {}, {}, None, {}
    if enrol_list and trial_list:
        models, enrol_utts = read_enrollment(enrol_list, problems, options["enrol_utts"])
        trials, test_utts = read_trial_lists(trial_list, key_list, models, problems)
    utts = train + list(enrol_utts.values()) + list(test_utts.values())
    bad = check_audio(data_folder, utts, problems, jobs, options["min_seconds"])
    if problems.items and not options["skip_bad"]:
        raise DataPrepError(problems.message())

    train = [u for u in train if u.file_id not in bad]
    train, dev_models, dev_enrol, dev_test = split_dev(
        train, options["dev_speakers"], options["seed"]
    )
    tables = {
        "train.csv": (UTT_FIELDS, _utt_rows(train)),
        "train_noise.csv": (NOISE_FIELDS, [[*row[:3], "wav", ""] for row in _utt_rows(train)]),
        "dev_enrol.csv": (MODEL_FIELDS, [[m, p, s, " ".join(ids)] for m, p, s, ids in dev_models]),
        "dev_enrol_utts.csv": (UTT_FIELDS, _utt_rows(dev_enrol)),
        "dev_test.csv": (UTT_FIELDS, _utt_rows(dev_test)),
        "dev_trials.csv": (TRIAL_FIELDS, [list(t) for t in dev_trials(dev_models, dev_test)]),
    }
    if models:
        tables.update(_eval_tables(models, enrol_utts, trials, test_utts, bad, problems))
    if options["skip_bad"]:
        tables["rejected.csv"] = (["item", "where", "reason"], [list(p) for p in problems.items])
    return tables, problems, audio_record(data_folder, utts, tables)


def _eval_tables(models, enrol_utts, trials: pd.DataFrame, test_utts, bad, problems):
    """The official enrollment models and trials, minus what bad files make unusable."""
    usable_models = {}
    for model_id, (phrase_id, enrol_ids, where) in models.items():
        good = [f for f in enrol_ids if f not in bad]
        if good:
            usable_models[model_id] = (phrase_id, good)
        else:
            problems.add(
                model_id,
                where,
                "enrollment model has no usable audio: model and its trials dropped",
            )
    kept = trials[trials["model_id"].isin(usable_models) & ~trials["test_id"].isin(bad)]
    keyed = kept["condition"] != ""
    if keyed.any() and not keyed.all():  # a key with gaps (skip_bad: each is a listed problem)
        kept = kept[keyed]  # those trials go; the split stays labelled, never scored blind
    used_enrol = {f for _, ids in usable_models.values() for f in ids}
    used_test = set(kept["test_id"].unique())
    labelled = kept["condition"] != ""
    label = np.where(labelled, (kept["condition"] == "TC").astype(int).astype(str), "")
    trial_rows = kept.assign(label=label)[TRIAL_FIELDS]  # written by pandas: 10M rows
    return {
        "eval_enrol.csv": (
            MODEL_FIELDS,
            [[m, p, "", " ".join(ids)] for m, (p, ids) in usable_models.items()],
        ),
        "eval_enrol_utts.csv": (
            UTT_FIELDS,
            _utt_rows([u for f, u in enrol_utts.items() if f in used_enrol]),
        ),
        "eval_test.csv": (
            UTT_FIELDS,
            _utt_rows([u for f, u in test_utts.items() if f in used_test]),
        ),
        "eval_trials.csv": (TRIAL_FIELDS, trial_rows),
    }


def _print_summary(save_folder: Path, tables: dict, problems: Problems) -> None:
    """One line per written table, and the number of rejected items."""
    counts = ", ".join(f"{name[:-4]}: {len(rows)}" for name, (_, rows) in tables.items())
    print(f"Wrote manifests to {save_folder} ({counts})")
    if problems.items:
        print(f"Excluded {len(problems.items)} bad files/lines: see {save_folder / 'rejected.csv'}")


def main(argv=None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_folder", required=True, help="the task1 folder (docs/ and wav/)")
    parser.add_argument("--save_folder", required=True, help="where the CSV manifests go")
    parser.add_argument("--dev_speakers", type=int, default=20, help="training speakers held out")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--include_free_text", action="store_true", help="keep free-text utterances"
    )
    parser.add_argument(
        "--skip_bad", action="store_true", help="exclude bad files, list them in rejected.csv"
    )
    parser.add_argument("--key_file", help="trial key (default: docs/trials_key.txt if present)")
    parser.add_argument("--jobs", type=int, help="threads reading the audio (default: cores)")
    parser.add_argument(
        "--enrol_utts", type=int, default=ENROL_UTTS,
        help="enrollment utterances per model (0: any number)",
    )  # fmt: skip
    parser.add_argument(
        "--min_seconds", type=float, default=MIN_SECONDS, help="shortest usable file (seconds)"
    )
    parser.add_argument(
        "--free_text_id", default=FREE_TEXT_ID, help="phrase id of free-text training lines"
    )
    args = parser.parse_args(argv)
    try:
        prepare_deepmine(**vars(args))
    except DataPrepError as error:
        sys.exit(f"deepmine_prepare: {error}")


if __name__ == "__main__":
    main()
