"""Building and writing the manifests of the corpus contract (``data_prep/corpus.py``).

What every preparer shares once it has read its corpus's lists into ``CorpusLists``: the audio
checks (every sample of every file, in parallel), the speaker-disjoint validation split
(``split_valid``), the tables of each official list pair (``official_tables``), and writing the
whole set atomically with a record of what it was made from (``prep_options.json``: options, a
hash of each manifest, the audio's identity, each official list's trial count), under a lock on
the folder. A preparer supplies only its readers (``prepare_manifests``).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import io
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import pandas as pd

from data_prep.audio_checks import MIN_SECONDS, file_problem
from data_prep.corpus import (
    FREE_TEXT_ID,
    MODEL_FIELDS,
    NOISE_FIELDS,
    SAMPLE_RATE,
    SPLITS,
    TRIAL_FIELDS,
    UTT_FIELDS,
    VALID_SPLIT,
    condition_of,
    file_digest,
)

MAX_REPORTED = 50  # problems listed in one error message (all go to rejected.csv with skip_bad)
ENROL_UTTS = 3  # enrollment utterances per model, as in the challenge (0: any number)


class ListLine(NamedTuple):
    """One data line of a whitespace-separated docs list, with its origin for error messages.

    A named tuple, not a dataclass: a 10M-line trial list makes 10M of them.
    """

    path: Path
    lineno: int
    fields: tuple[str, ...]

    @property
    def where(self) -> str:
        """``file:line`` for error messages."""
        return f"{self.path}:{self.lineno}"


def not_utf8(path, data: bytes, error: UnicodeDecodeError) -> TextEncodingError:
    """The named error of ``path`` (its bytes ``data``) failing to decode at ``error``."""
    line = data.count(b"\n", 0, error.start) + 1
    byte = data[error.start : error.start + 1].hex()
    return TextEncodingError(
        f"{path}:{line}: not UTF-8 (byte 0x{byte}); lists, tables and transcripts are read as "
        f"UTF-8. Convert the file, e.g. from Windows Arabic/Persian: iconv -f CP1256 -t UTF-8 "
        f"{path} > {path}.utf8 (from Latin-1: -f LATIN1), and use the converted copy"
    )


def read_utf8(path) -> str:
    """The text of ``path`` (UTF-8, a byte-order mark dropped), or a ``TextEncodingError``."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise not_utf8(path, data, error) from None


def check_utf8(path) -> None:
    """Raise ``read_utf8``'s named error for ``path`` (after a reader failed to decode it)."""
    read_utf8(path)


def read_list(path: Path, header: bool = True) -> list[ListLine]:
    """The lines of a whitespace-separated list, each with its file and line number.

    Blank lines are ignored, and with ``header`` a first line whose first field ends in "-id"
    (DeepMine's docs lists have one; Kaldi tables do not, and an id may end so). Every other line
    is kept with its number so that callers can report a bad line precisely.
    """
    lines, path = [], Path(path)
    with io.StringIO(read_utf8(path), newline=None) as handle:  # newlines as open() reads them
        for lineno, text in enumerate(handle, start=1):
            fields = tuple(text.split())
            if not fields or (header and lineno == 1 and fields[0].lower().endswith("-id")):
                continue
            lines.append(ListLine(path, lineno, fields))
    return lines


class DataPrepError(ValueError):
    """The corpus folder has problems; the message lists each with its file and line."""


class TextEncodingError(DataPrepError):
    """A list or table that is not UTF-8: its file, line and byte, and how to convert it."""


@dataclass
class Utt:
    """One utterance: id, its file, the list line that names it, and what we know about it.

    ``path`` is relative to the corpus folder (POSIX), or absolute where a corpus may list audio
    outside it.
    """

    file_id: str
    path: str
    where: str  # the list line that names it
    spk_id: str = ""
    phrase_id: str = ""  # the corpus's phrase id, FREE_TEXT_ID, or "" (blind test)
    phrase: str = ""  # the phrase's text, where known
    language: str = ""
    duration: float = 0.0
    digest: str = ""  # of its samples (``audio_checks.FileCheck``), once checked

    @property
    def manifest_wav(self) -> str:
        """Its ``wav`` column in a manifest: ``$data_root/<path>``, or the absolute path."""
        if PurePosixPath(self.path).is_absolute():
            return self.path
        return f"$data_root/{self.path}"


class EvalModel(NamedTuple):
    """One enrollment model of a corpus's own lists."""

    phrase_id: str
    enrol_ids: list[str]
    where: str  # the list line that defines it
    gender: str = ""  # m / f where the list gives it (TdSV 2024)


class OfficialSplit(NamedTuple):
    """One official list pair as read: models, trials and the utterances they name.

    ``trials`` has the columns ``model_id``, ``test_id``, ``condition`` ("" for a blind list),
    in the list's order; ``listed_trials`` counts the list's trial lines (bad ones included):
    the number of scores its answer file must hold.
    """

    models: dict[str, EvalModel]
    enrol_utts: dict[str, Utt]
    trials: pd.DataFrame
    test_utts: dict[str, Utt]
    trial_list: Path
    listed_trials: int


class CorpusLists(NamedTuple):
    """What a preparer read from a corpus, in the contract's terms (``prepare_manifests``).

    ``official``: each official list pair by split name (``OFFICIAL_SPLITS``: ``eval``, and
    TdSV 2024's ``dev``); empty when the corpus has none.
    """

    train: list[Utt]
    official: dict[str, OfficialSplit]


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


def expect_fields(
    line: ListLine, count: int, problems: Problems, at_least=False, fields: str = ""
) -> bool:
    """Check the number of fields of a list line; record a problem if it is wrong."""
    ok = len(line.fields) >= count if at_least else len(line.fields) == count
    if not ok:
        expected = f"{'at least ' if at_least else ''}{count} fields{fields}"
        problems.add(" ".join(line.fields), line.where, f"expected {expected}")
    return ok


def first_occurrence(key, seen: dict, line: ListLine, problems: Problems) -> bool:
    """False (and a problem) if ``key`` was already defined on an earlier line."""
    if key in seen:
        problems.add(key, line.where, f"duplicate id (first at {seen[key].where})")
        return False
    seen[key] = line  # its place is formatted only for a message: 10M lines in a trial list
    return True


#: The longest file name most file systems take (bytes), ``.wav`` included.
MAX_FILE_NAME = 255


def unsafe_id(file_id: str) -> str | None:
    """Why an utterance id cannot name a file under the corpus folder; None when it can.

    A layout may join an id into a path (DeepMine's ``wav/<subdir>/<id>.wav``): a path
    separator, ``..`` or an absolute path would read (and train on) files outside the data
    folder; a NUL or an over-long name fails inside a thread pool with a message that names no
    list line. Every preparer refuses such ids, so that an id is a name everywhere.
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
    paths = [Path(root) / u.path for u in utts]  # an absolute path stays as it is
    unique = list(dict.fromkeys(paths))  # a file two lists name (a dev and an eval trial) once
    check = partial(file_problem, sample_rate=SAMPLE_RATE, min_seconds=min_seconds)
    with ThreadPoolExecutor(max_workers=jobs) as pool:  # libsndfile releases the GIL
        results = dict(zip(unique, pool.map(check, unique, chunksize=64), strict=True))
    reported = set()
    for utt, path in zip(utts, paths, strict=True):
        duration, reason, digest = results[path]
        utt.duration, utt.digest = duration, digest
        if reason:
            if path not in reported:
                problems.add(str(path), utt.where, reason)
                reported.add(path)
            bad.add(utt.file_id)
    return bad


class ValidSplit(NamedTuple):
    """The held-out-speaker split: its models, their utterances, the test utterances, why so."""

    models: list[tuple[str, str, str, list[str], str]]  # model, phrase, speaker, ids, language
    enrol: list[Utt]
    test: list[Utt]
    enrol_size: int  # enrollment utterances per model
    reason: str  # why that many (for the log)


def valid_enrol_size(counts: list[int], eval_size: int, requested: int | None):
    """``(size, reason)``: how many enrollment utterances each validation model has.

    ``counts``: utterances of each held-out (speaker, pass-phrase). ``requested`` (the
    ``valid_enrol_utts`` setting) is used as it is; by default the evaluation's size
    (``eval_size``) where at least half of the held-out pairs have an utterance to spare for a
    test, otherwise the largest size for which they do (a corpus whose speakers say each
    phrase 4 times, evaluated with 5-utterance models, gets validation models of 3).
    """
    if requested:
        return requested, f"valid_enrol_utts: {requested}"
    typical = int(np.sort(counts)[(len(counts) - 1) // 2]) if counts else 0  # the lower median
    size = min(eval_size, typical - 1)
    if size == eval_size:
        return size, f"the evaluation's size ({eval_size})"
    return size, (
        f"the evaluation's models have {eval_size}, but the held-out speakers say a pass-phrase "
        f"{typical} times (median): {size} enrollment + at least 1 test utterance "
        "(valid_enrol_utts sets it)"
    )


def split_valid(
    train: list[Utt],
    valid_speakers: int,
    seed: int,
    enrol_utts: int = ENROL_UTTS,
    valid_enrol_utts: int | None = None,
) -> tuple[list[Utt], ValidSplit]:
    """Hold out whole speakers: ``(training utterances, ValidSplit)``.

    Each held-out (speaker, pass-phrase) with more utterances than the validation models'
    size (``valid_enrol_size``) gives one model of that many random enrollment utterances; all
    other utterances of held-out speakers are test utterances. A split without models, or
    without both target and non-target trials, is a ``DataPrepError`` naming the settings that
    change it: training would otherwise select checkpoints on nothing for hours.
    """
    speakers = sorted({u.spk_id for u in train})
    if valid_speakers >= len(speakers):
        raise DataPrepError(
            f"valid_speakers={valid_speakers} but the training list has only {len(speakers)} "
            "speakers"
        )
    rng = np.random.default_rng(seed)
    held_out = set(rng.choice(speakers, valid_speakers, replace=False).tolist())
    groups = defaultdict(list)
    for utt in train:
        if utt.spk_id in held_out:
            groups[(utt.spk_id, utt.phrase_id)].append(utt)
    counts = [len(utts) for (_, phrase), utts in groups.items() if phrase != FREE_TEXT_ID]
    size, reason = valid_enrol_size(counts, enrol_utts or ENROL_UTTS, valid_enrol_utts)
    models, enrol, test = [], [], []
    for (spk_id, phrase_id), utts in sorted(groups.items()):
        order = [utts[i] for i in rng.permutation(len(utts))]
        if phrase_id != FREE_TEXT_ID and size >= 1 and len(order) > size:
            model_id = f"{VALID_SPLIT}_{spk_id}_{phrase_id}"
            ids = [u.file_id for u in order[:size]]
            models.append((model_id, phrase_id, spk_id, ids, order[0].language))
            enrol += order[:size]
            order = order[size:]
        test += order
    split = ValidSplit(models, enrol, test, size, reason)
    check_valid_split(split, valid_speakers, max(counts, default=0))
    return [u for u in train if u.spk_id not in held_out], split


def check_valid_split(split: ValidSplit, valid_speakers: int, most: int) -> None:
    """Refuse a validation split that cannot select a checkpoint (see ``split_valid``)."""
    if not split.models:
        size = max(split.enrol_size, 1)
        raise DataPrepError(
            f"the validation split has no model: a model needs {size} enrollment utterance(s) "
            f"and a test utterance of one pass-phrase by one held-out speaker, and the "
            f"{valid_speakers} held-out speakers say a pass-phrase at most {most} time(s). "
            "Hold out speakers with more repetitions (valid_speakers, seed), lower "
            "valid_enrol_utts, or use a corpus whose training speakers repeat their phrases"
        )
    speakers = {spk for _, _, spk, _, _ in split.models} | {u.spk_id for u in split.test}
    phrases = {phrase for _, phrase, _, _, _ in split.models} | {u.phrase_id for u in split.test}
    if len(speakers) < 2 and len(phrases) < 2:
        raise DataPrepError(
            "the validation split has no non-target trial: its one held-out speaker says one "
            "phrase. Hold out more speakers (valid_speakers)"
        )


def valid_trials(models, test: list[Utt]) -> list[tuple[str, str, int, str]]:
    """Every validation model against every validation test utterance, labelled.

    Free-text test utterances (kept with ``include_free_text``) give wrong-phrase trials (TW with
    their speaker's models, IW with the others'), as in TdSV 2024's evaluation: the fusion then
    learns to reject sentences that are no pass-phrase.
    """
    trials = []
    tests = list(test)
    for model_id, phrase_id, spk_id, *_ in models:
        for utt in tests:
            condition = condition_of(utt.spk_id == spk_id, utt.phrase_id == phrase_id)
            trials.append((model_id, utt.file_id, int(condition == "TC"), condition))
    return trials


def utt_rows(utts: list[Utt]) -> list[list]:
    """Manifest rows for utterances (speaker/phrase blank where unknown, as for eval data)."""
    return [
        [u.file_id, f"{u.duration:.3f}", u.manifest_wav, u.spk_id, u.phrase_id, u.phrase,
         u.language]
        for u in utts
    ]  # fmt: skip


def up_to_date(marker: Path, fingerprint: dict, data_folder: Path) -> bool:
    """Whether the manifests beside ``marker`` were made from ``fingerprint`` and are as written.

    ``data_folder``: where the corpus is now (its audio's times are checked there).

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
    recorded = record.get("options") if isinstance(record, dict) else None
    if recorded != fingerprint:
        differing = sorted(
            key for key in {*(recorded or {}), *fingerprint}
            if (recorded or {}).get(key) != fingerprint.get(key)
        )  # fmt: skip
        print(
            f"Data prep's lists or settings changed since {marker} was written ("
            f"{', '.join(differing)}; lists: their sizes and times): preparing again."
        )
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
    if audio.get("stat") != audio_stamp(Path(data_folder).resolve(), wavs):
        print(
            f"Audio changed since data prep (the size or time of one of the {len(wavs)} listed "
            "files, or one is missing): preparing again."
        )
        return False
    return True


UTTERANCE_MANIFESTS = (
    "train.csv",
    *(f"{split}_{kind}.csv" for split in SPLITS for kind in ("enrol_utts", "test")),
)


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


def write_all(
    save_folder: Path,
    tables: dict[str, tuple[list[str], list[list]]],
    marker: str,
    options: dict,
    audio: dict,
    official: dict | None = None,
) -> None:
    """Write every CSV under a temporary name, then rename them all: never a partial set.

    The ``marker`` file (the ``options``, a hash of each manifest, the ``audio_record`` and the
    ``official`` lists' record, ``official_record``) is written last;
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
        record = {
            "options": options,
            "manifests": digests,
            "audio": audio,
            "official": official or {},
        }
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


def official_tables(split: str, lists: OfficialSplit, bad: set[str], problems: Problems) -> dict:
    """An official list pair's manifests (``<split>_*.csv``), minus what bad files make unusable.

    A model's language is its enrollment utterances' (blank where the corpus gives none).
    """
    models, enrol_utts, trials, test_utts = lists[:4]
    usable_models = {}
    for model_id, (phrase_id, enrol_ids, where, gender) in models.items():
        good = [f for f in enrol_ids if f not in bad]
        if good:
            usable_models[model_id] = (phrase_id, good, enrol_utts[good[0]].language, gender)
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
    used_enrol = {f for _, ids, _, _ in usable_models.values() for f in ids}
    used_test = set(kept["test_id"].unique())
    labelled = kept["condition"] != ""
    label = np.where(labelled, (kept["condition"] == "TC").astype(int).astype(str), "")
    trial_rows = kept.assign(label=label)[TRIAL_FIELDS]  # written by pandas: 10M rows
    model_rows = [
        [m, p, "", " ".join(ids), lang, gender]
        for m, (p, ids, lang, gender) in usable_models.items()
    ]
    return {
        f"{split}_enrol.csv": (MODEL_FIELDS, model_rows),
        f"{split}_enrol_utts.csv": (
            UTT_FIELDS,
            utt_rows([u for f, u in enrol_utts.items() if f in used_enrol]),
        ),
        f"{split}_test.csv": (
            UTT_FIELDS,
            utt_rows([u for f, u in test_utts.items() if f in used_test]),
        ),
        f"{split}_trials.csv": (TRIAL_FIELDS, trial_rows),
    }


def valid_tables(split: ValidSplit) -> dict:
    """The validation split's manifests (``valid_*.csv``)."""
    models = [[m, p, s, " ".join(ids), lang, ""] for m, p, s, ids, lang in split.models]
    trials = [list(t) for t in valid_trials(split.models, split.test)]
    return {
        f"{VALID_SPLIT}_enrol.csv": (MODEL_FIELDS, models),
        f"{VALID_SPLIT}_enrol_utts.csv": (UTT_FIELDS, utt_rows(split.enrol)),
        f"{VALID_SPLIT}_test.csv": (UTT_FIELDS, utt_rows(split.test)),
        f"{VALID_SPLIT}_trials.csv": (TRIAL_FIELDS, trials),
    }


def official_record(lists: CorpusLists, tables: dict) -> dict:
    """``{split: {"trial_list", "listed_trials", "kept_trials"}}`` of each official list pair.

    What an answer file is checked against: the list's trial count and how many of its trials
    the manifests keep (fewer only where ``skip_bad`` left bad ones out).
    """
    return {
        split: {
            "trial_list": str(official.trial_list),
            "listed_trials": official.listed_trials,
            "kept_trials": len(tables[f"{split}_trials.csv"][1]),
        }
        for split, official in lists.official.items()
    }


def print_summary(save_folder: Path, tables: dict, problems: Problems, official: dict) -> None:
    """One line per written table, the number of rejected items, and incomplete official lists.

    An official list that lost trials (``skip_bad``) can give no answer file: every trial of a
    submission needs a score.
    """
    counts = ", ".join(f"{name[:-4]}: {len(rows)}" for name, (_, rows) in tables.items())
    print(f"Wrote manifests to {save_folder} ({counts})")
    if problems.items:
        print(f"Excluded {len(problems.items)} bad files/lines: see {save_folder / 'rejected.csv'}")
    for split, record in official.items():
        if record["kept_trials"] != record["listed_trials"]:
            print(
                f"WARNING: {split}: {record['kept_trials']} of the {record['listed_trials']} "
                f"trials of {record['trial_list']} are kept (bad files or lines left out): "
                f"its reports cover those, and no answer file can be written for {split}"
            )


def manifest_tables(
    data_folder: Path, lists: CorpusLists, problems: Problems, options: dict, jobs: int
):
    """Check the audio, split off validation, make every table: ``(tables by name, audio record)``.

    ``options``: ``skip_bad``, ``valid_speakers``, ``valid_enrol_utts``, ``seed``,
    ``enrol_utts``, ``min_seconds``. Raises ``DataPrepError`` naming every problem unless
    ``skip_bad`` (then they are left out and listed in ``rejected.csv``): the lists' problems
    before any audio is read, the audio's after.
    """
    if problems.items and not options["skip_bad"]:
        raise DataPrepError(problems.message())
    utts = lists.train + [
        utt
        for official in lists.official.values()
        for utt in [*official.enrol_utts.values(), *official.test_utts.values()]
    ]
    bad = check_audio(data_folder, utts, problems, jobs, options["min_seconds"])
    if problems.items and not options["skip_bad"]:
        raise DataPrepError(problems.message())
    train = [u for u in lists.train if u.file_id not in bad]
    train, valid = split_valid(
        train, options["valid_speakers"], options["seed"], options["enrol_utts"],
        options["valid_enrol_utts"],
    )  # fmt: skip
    print(
        f"Validation split: {options['valid_speakers']} held-out training speakers, "
        f"{len(valid.models)} models of {valid.enrol_size} enrollment utterance(s) "
        f"({valid.reason}), {len(valid.test)} test utterances"
    )
    train_rows = utt_rows(train)
    tables = {
        "train.csv": (UTT_FIELDS, train_rows),
        "train_noise.csv": (NOISE_FIELDS, [[*row[:3], "wav", ""] for row in train_rows]),
        **valid_tables(valid),
    }
    for split, official in lists.official.items():
        tables.update(official_tables(split, official, bad, problems))
    if options["skip_bad"]:
        tables["rejected.csv"] = (["item", "where", "reason"], [list(p) for p in problems.items])
    return tables, audio_record(data_folder, utts, tables)


def list_fingerprint(layout: str, version: int, data_folder: Path, lists, options: dict) -> dict:
    """What a preparer's manifests depend on besides the audio, to know when a redo is needed.

    The layout and its preparer's ``version``, the size and time of each of its ``lists`` that
    exists (by its path in the corpus folder), and the ``options``. Not where the corpus is:
    the manifests name audio as ``$data_root/...``, so a corpus copied or moved with its file
    times (``cp -a``, ``mv``, ``rsync -a``) is the same corpus, and its manifests are reused.
    """
    root = Path(data_folder).resolve()
    stamp = {
        in_corpus(p, root): [p.stat().st_size, p.stat().st_mtime_ns] for p in lists if p.is_file()
    }
    return {"layout": layout, "version": version, "lists": stamp, **options}


def in_corpus(path, root) -> str:
    """``path`` relative to the corpus folder ``root`` (POSIX), or absolute outside it."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


#: Data prep's record of what the manifests were made from, beside them.
PREP_RECORD = "prep_options.json"


def prepare_manifests(
    data_folder: Path,
    save_folder: Path,
    fingerprint: dict,
    read_lists: Callable[[Problems], CorpusLists],
    options: dict,
    jobs: int | None = None,
) -> dict[str, Path]:
    """A preparer's whole run: skip when up to date, else read, check, split and write all.

    ``fingerprint``: what the manifests depend on besides the audio (options and the lists'
    sizes and times, ``list_fingerprint``). ``read_lists(problems)`` reads the
    corpus's lists, recording each problem. Holds a lock on ``save_folder`` meanwhile:
    concurrent runs take turns. ``jobs`` threads read the audio (default: one per CPU core;
    more pay off only on network storage). Returns the written CSVs by name.
    """
    jobs = jobs or min(16, os.cpu_count() or 1)
    with folder_lock(save_folder):
        marker = save_folder / PREP_RECORD
        if up_to_date(marker, fingerprint, data_folder):
            print(
                f"Manifests in {save_folder} are up to date (same lists, options, audio, and "
                "each manifest as written): skipping data prep."
            )
            return {p.stem: p for p in save_folder.glob("*.csv")}
        problems = Problems()
        lists = read_lists(problems)
        tables, audio = manifest_tables(data_folder, lists, problems, options, jobs)
        official = official_record(lists, tables)
        write_all(save_folder, tables, marker.name, fingerprint, audio, official)
    print_summary(save_folder, tables, problems, official)
    return {Path(name).stem: save_folder / name for name in tables}


def official_lists(save_folder) -> dict:
    """The official list pairs that the manifests in ``save_folder`` were made from.

    ``{split: {"trial_list", "listed_trials", "kept_trials"}}`` (``official_record``), read
    from data prep's record; empty for manifests without official lists.
    """
    record = json.loads((Path(save_folder) / PREP_RECORD).read_text())
    return record.get("official") or {}


def preparer_parser(description: str, corpus_help: str) -> argparse.ArgumentParser:
    """The command line that every preparer shares; each adds its own options.

    An option not given is left out, so the preparer's own signature holds every default.
    """
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--data_folder", required=True, help=corpus_help)
    parser.add_argument("--save_folder", required=True, help="where the CSV manifests go")
    parser.add_argument(
        "--valid_speakers", type=int, help="training speakers held out (validation)"
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--include_free_text", action="store_true", help="keep free text")
    parser.add_argument(
        "--skip_bad", action="store_true", help="exclude bad files and lines, list them in "
        "rejected.csv"
    )  # fmt: skip
    parser.add_argument(
        "--enrol_utts", type=int, help="enrollment utterances per model (0: any number)"
    )
    parser.add_argument(
        "--valid_enrol_utts", type=int,
        help="enrollment utterances per validation model (default: what the repetitions allow)",
    )  # fmt: skip
    parser.add_argument("--min_seconds", type=float, help="shortest usable file (seconds)")
    parser.add_argument("--jobs", type=int, help="threads reading the audio (default: cores)")
    return parser


def run_preparer(prepare: Callable, args: argparse.Namespace, name: str) -> None:
    """Run a preparer from its command line; its ``DataPrepError`` is the exit message."""
    try:
        prepare(**vars(args))
    except DataPrepError as error:
        sys.exit(f"{name}: {error}")
