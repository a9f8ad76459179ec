"""Turn Kaldi-style data directories of a text-dependent corpus into the recipe's manifests.

The layout (``corpus: kaldi``); every path in a ``wav.scp`` is absolute or relative to the
corpus folder::

    CORPUS/train/wav.scp    <utt> <path>
    CORPUS/train/utt2spk    <utt> <speaker>
    CORPUS/train/text       <utt> <transcript>
    CORPUS/enroll/wav.scp   <utt> <path>
    CORPUS/enroll/text      <utt> <transcript>
    CORPUS/enroll/models    <model> <utt> <utt> ...
    CORPUS/test/wav.scp     <utt> <path>
    CORPUS/trials           <model> <test-utt> [target|nontarget [TC|TW|IC|IW]]

A text-independent corpus (VoxCeleb-style: a first stage of training) has neither ``text`` nor
``utt2phrase`` in ``train/`` and ``enroll/``: every utterance is one phrase, so the run trains
speaker targets with the phrase branch off (``phrase_branch: False``, ``fusion: none``), and its
trials are of the plain form (``target`` / ``nontarget``).

Optional: ``train/utt2phrase`` and ``enroll/utt2phrase`` (``<utt> <phrase-id>``) give phrase ids
where a corpus has them (they override ``text``); ``train/utt2lang`` and ``enroll/utt2lang``
(``<utt> <language>``) give the per-language report rows.

- A phrase is a normalized transcript (``normalized``: case, punctuation and spacing ignored),
  or a ``utt2phrase`` id. A phrase seen at least ``phrase_min_count`` times in training is a
  pass-phrase, numbered ``p01``, ``p02``, ... in the order of its normalized text; rarer
  transcripts are free text (``FREE_TEXT_ID``, kept with ``include_free_text``).
- A model's phrase is the common phrase of its enrollment utterances: utterances that disagree,
  or a phrase that training does not have, are an error naming the model.
- Test transcripts are never read: test utterances are blind, as in the challenge.
- Trials with labels are scored and reported (``target`` alone is TC, ``nontarget`` alone NT:
  pooled numbers only); trials without labels get ``answer.txt`` only.
- Audio outside the corpus folder (an absolute path elsewhere, or ``..``) is refused unless
  ``audio_outside_data_folder``.

Every check of the DeepMine preparer applies (audio, ids, duplicates, one error naming every
problem with its file and line, nothing partial written): both share ``data_prep/manifests.py``.

Usage::

    python data_prep/kaldi_prepare.py --data_folder /data/rsr2015_kaldi --save_folder prep
"""

from __future__ import annotations

import os
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.audio_checks import MIN_SECONDS
from data_prep.corpus import FREE_TEXT_ID
from data_prep.manifests import (
    ENROL_UTTS,
    CorpusLists,
    DataPrepError,
    EvalModel,
    ListLine,
    OfficialSplit,
    Problems,
    Utt,
    check_utf8,
    first_occurrence,
    list_fingerprint,
    prepare_manifests,
    preparer_parser,
    read_list,
    run_preparer,
)

PREP_VERSION = 2  # bump when the manifests change, so existing ones are redone
PHRASE_MIN_COUNT = 5

#: The files of the layout (``optional`` may be absent).
REQUIRED = ("train/wav.scp", "train/utt2spk", "enroll/wav.scp", "enroll/models", "test/wav.scp",
            "trials")  # fmt: skip
#: The transcripts: in both data directories, or in neither (a text-independent corpus).
TRANSCRIPTS = ("train/text", "enroll/text")
OPTIONAL = ("train/utt2phrase", "train/utt2lang", "enroll/utt2phrase", "enroll/utt2lang")
#: The phrase key of every utterance of a text-independent corpus (one phrase).
TEXT_INDEPENDENT = ""


def labelled_dirs(corpus: Path) -> list[str]:
    """The data directories of ``corpus`` whose utterances have transcripts or phrase ids."""
    return [
        name for name in ("train", "enroll")
        if (corpus / name / "text").is_file() or (corpus / name / "utt2phrase").is_file()
    ]  # fmt: skip


#: Trial labels and conditions (``target`` alone is TC, ``nontarget`` alone NT).
TARGET_LABELS = ("target", "nontarget")
LABELLED_CONDITIONS = ("TC", "TW", "IC", "IW")


#: Letters typed two ways in Persian text (Arabic and Persian keyboards), as one: Arabic kaf and
#: yeh (and alef maksura) as Persian keheh and yeh, the zero-width non-joiner as a space, and
#: Arabic-Indic and Persian digits as ASCII ones.
LETTER_VARIANTS = str.maketrans(
    {
        "\u0643": "\u06a9",  # kaf -> keheh
        "\u064a": "\u06cc",  # Arabic yeh -> Farsi yeh
        "\u0649": "\u06cc",  # alef maksura -> Farsi yeh
        "\u200c": " ",  # zero-width non-joiner
        **{chr(0x0660 + d): str(d) for d in range(10)},
        **{chr(0x06F0 + d): str(d) for d in range(10)},
    }
)


def normalized(text: str) -> str:
    """A transcript as a phrase: Unicode-normalized, case-folded, punctuation and spacing gone.

    Letters that Persian text writes two ways are one (``LETTER_VARIANTS``).
    """
    text = unicodedata.normalize("NFKC", text).casefold().translate(LETTER_VARIANTS)
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(kept.split())


def read_table(path: Path, problems: Problems, what: str, whole_rest=False) -> dict:
    """``{key: (value, line)}`` of a ``<key> <value>`` table; a bad or repeated line is a problem.

    ``whole_rest``: the value is the rest of the line (a transcript), else exactly one field.
    """
    table, seen = {}, {}
    for line in read_list(path, header=False):
        fields = line.fields
        if len(fields) < 2:
            problems.add(" ".join(fields), line.where, f"expected an id and {what}")
            continue
        if len(fields) > 2 and not whole_rest:
            problems.add(
                " ".join(fields),
                line.where,
                f"expected an id and {what}, got {len(fields) - 1} fields (a Kaldi command or a "
                "path with spaces is not read: list audio files)",
            )
            continue
        if first_occurrence(fields[0], seen, line, problems):
            table[fields[0]] = (" ".join(fields[1:]), line)
    return table


def audio_path(corpus: Path, value: str, line: ListLine, problems: Problems, outside_ok: bool):
    """The ``Utt.path`` of a ``wav.scp`` value (None and a problem when it is not usable).

    Relative to the corpus folder, or absolute; a path inside the corpus folder is kept
    relative (a moved corpus stays valid). A command (Kaldi's ``... |``) is refused: the
    recipe reads audio files.
    """
    if value.endswith("|") or value.startswith("-"):
        problems.add(value, line.where, "a command or pipe, not an audio file: write wav files")
        return None
    if re.search(r"\.(ark|scp):\d+$", value) or value.startswith(("ark:", "scp:")):
        problems.add(
            value, line.where,
            "a Kaldi archive entry, not an audio file: archives are not read; write wav files "
            "(e.g. wav-copy) and list their paths",
        )  # fmt: skip
        return None
    root = os.path.normpath(corpus.absolute())
    full = os.path.normpath(os.path.join(root, value))  # an absolute value stays absolute
    # Inside by its text and where it really is: a symbolic link in the corpus may lead out.
    resolved_root = os.path.realpath(root)
    inside = os.path.commonpath([root, full]) == root and (
        os.path.commonpath([resolved_root, os.path.realpath(full)]) == resolved_root
    )
    if inside:
        return Path(os.path.relpath(full, root)).as_posix()
    if not outside_ok:
        problems.add(
            value,
            line.where,
            f"outside the corpus folder {corpus}, by its path or through a symbolic link (set "
            "audio_outside_data_folder: True to allow)",
        )
        return None
    return Path(full).as_posix()


def near_duplicates(phrases: list[str]) -> list[tuple[str, str]]:
    """Pairs of ``phrases`` that one edit (insert, delete or replace a character) makes equal."""
    return [
        (a, b)
        for i, a in enumerate(phrases)
        for b in phrases[i + 1 :]
        if abs(len(a) - len(b)) <= 1 and _one_edit(a, b)
    ]


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` (lengths within one) differ by exactly one edit."""
    if len(a) > len(b):
        a, b = b, a
    start = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
    if len(a) == len(b):
        return a[start + 1 :] == b[start + 1 :] and start < len(a)
    return a[start:] == b[start + 1 :]


class Phrases:
    """The corpus's pass-phrases, from the training transcripts (or ``utt2phrase`` ids)."""

    def __init__(self, keys: list[str], texts: dict[str, str], min_count: int):
        counts = Counter(keys)
        kept = sorted(key for key, count in counts.items() if count >= min_count)
        width = max(2, len(str(len(kept))))
        self.ids = {key: f"p{i + 1:0{width}d}" for i, key in enumerate(kept)}
        self.texts, self.counts, self.min_count = texts, counts, min_count
        for first, second in near_duplicates(kept):
            print(
                f"warning: phrases {self.ids[first]} ({first!r}, {counts[first]} utterances) and "
                f"{self.ids[second]} ({second!r}, {counts[second]}) differ by one character: "
                "one phrase typed two ways? If so, write it one way in the transcripts"
            )

    def of(self, key: str) -> str:
        """The phrase id of a normalized transcript (or ``utt2phrase`` id); free text if rare."""
        return self.ids.get(key, FREE_TEXT_ID)


class Labels:
    """What labels an utterance in one data directory: phrase key, text and language."""

    def __init__(self, folder: Path, problems: Problems, text_independent: bool = False):
        self.folder, self.text_independent = folder, text_independent
        self.text = {}
        if not text_independent:
            self.text = read_table(folder / "text", problems, "a transcript", whole_rest=True)
        self.utt2phrase = _optional(folder / "utt2phrase", problems, "a phrase id")
        self.utt2lang = _optional(folder / "utt2lang", problems, "a language")

    def key(self, utt: str) -> str | None:
        """The phrase key of ``utt``: its ``utt2phrase`` id, else its normalized transcript."""
        if self.text_independent:
            return TEXT_INDEPENDENT
        if self.utt2phrase is not None:
            return self.utt2phrase[utt][0] if utt in self.utt2phrase else None
        return normalized(self.text[utt][0]) if utt in self.text else None

    def missing(self) -> str:
        """The file that must name every utterance."""
        return str(self.folder / ("utt2phrase" if self.utt2phrase is not None else "text"))

    def language(self, utt: str) -> str:
        """The utterance's language, blank where the corpus gives none."""
        return self.utt2lang[utt][0] if self.utt2lang and utt in self.utt2lang else ""


def _optional(path: Path, problems: Problems, what: str):
    """``read_table`` of an optional file; None when it is absent."""
    return read_table(path, problems, what) if path.is_file() else None


def read_audio_list(corpus: Path, name: str, problems: Problems, outside_ok: bool, seen: dict):
    """``{utt: Utt}`` of ``<name>/wav.scp`` (no labels yet); ``seen``: ids of every data dir.

    A ``segments`` file (utterances cut from longer recordings) is refused: each utterance must
    be its own audio file.
    """
    utts = {}
    segments = corpus / name / "segments"
    if segments.is_file():
        problems.add(
            str(segments), str(segments),
            "utterances cut from recordings (Kaldi segments) are not supported: write each "
            "segment as its own wav file (e.g. Kaldi's extract-segments) and list those in "
            "wav.scp",
        )  # fmt: skip
        return utts
    for utt, (value, line) in read_table(corpus / name / "wav.scp", problems, "a path").items():
        if utt in seen:
            problems.add(utt, line.where, f"duplicate utterance id (also at {seen[utt].where})")
            continue
        seen[utt] = line
        path = audio_path(corpus, value, line, problems, outside_ok)
        if path is not None:
            utts[utt] = Utt(utt, path, line.where)
    return utts


def _named_by(table: dict, known: dict, problems: Problems, path: Path) -> None:
    """A line of ``path`` naming an utterance its ``wav.scp`` lacks is a problem."""
    for utt, (_, line) in table.items():
        if utt not in known:
            problems.add(utt, line.where, f"not in {path.parent / 'wav.scp'}")


def read_train(corpus: Path, problems: Problems, options: dict, seen: dict):
    """Training utterances with speaker, phrase (free text kept if asked) and language."""
    utts = read_audio_list(corpus, "train", problems, options["outside_ok"], seen)
    utt2spk = read_table(corpus / "train" / "utt2spk", problems, "a speaker")
    labels = Labels(corpus / "train", problems, options["text_independent"])
    for table, path in ((utt2spk, "utt2spk"), (labels.text, "text")):
        _named_by(table, utts, problems, corpus / "train" / path)
    keys = {}
    for utt, u in list(utts.items()):
        key = labels.key(utt)
        if utt not in utt2spk:
            problems.add(utt, u.where, f"utterance missing from {corpus / 'train' / 'utt2spk'}")
        elif key is None:
            problems.add(utt, u.where, f"utterance missing from {labels.missing()}")
        else:
            keys[utt] = key
            continue
        del utts[utt]
    texts = {}
    for utt, key in keys.items():  # a phrase's text: its first transcript as written
        texts.setdefault(key, labels.text[utt][0] if utt in labels.text else key)
    phrases = Phrases(list(keys.values()), texts, options["phrase_min_count"])
    train = []
    for utt, u in utts.items():
        phrase_id = phrases.of(keys[utt])
        if phrase_id == FREE_TEXT_ID and not options["include_free_text"]:
            continue
        u.spk_id, u.phrase_id, u.language = utt2spk[utt][0], phrase_id, labels.language(utt)
        u.phrase = phrases.texts[keys[utt]] if phrase_id != FREE_TEXT_ID else ""
        train.append(u)
    return train, phrases


def read_enroll(corpus: Path, problems: Problems, options: dict, seen: dict, phrases: Phrases):
    """Models ``{model_id: EvalModel}``, their utterances, and the ids of refused models.

    Each model has ``enrol_utts`` utterances (0: any number) of one training phrase.
    """
    utts = read_audio_list(corpus, "enroll", problems, options["outside_ok"], seen)
    labels = Labels(corpus / "enroll", problems, options["text_independent"])
    _named_by(labels.text, utts, problems, corpus / "enroll" / "text")
    models, enrolled, seen_models, owner = {}, {}, {}, {}
    refused = set()  # models named with a problem: their trials go with them, unsaid
    enrol_utts = options["enrol_utts"]
    for line in read_list(corpus / "enroll" / "models", header=False):
        model_id, ids = line.fields[0], list(line.fields[1:])
        if not first_occurrence(model_id, seen_models, line, problems):
            continue
        refused.add(model_id)
        if not ids or (enrol_utts and len(ids) != enrol_utts):
            count = f"{enrol_utts}" if enrol_utts else "at least 1"
            problems.add(model_id, line.where, f"{len(ids)} enrollment utterances, expected "
                         f"{count} (see enrol_utts)")  # fmt: skip
            continue
        phrase_id = _model_phrase(model_id, ids, line, labels, utts, owner, phrases, problems)
        if phrase_id is None:
            continue
        refused.discard(model_id)
        owner.update({utt: f"{model_id} ({line.where})" for utt in ids})
        models[model_id] = EvalModel(phrase_id, ids, line.where)
        for utt in ids:
            u = utts[utt]
            u.phrase_id, u.phrase, u.language = (
                phrase_id,
                phrases.texts[labels.key(utt)],
                (labels.language(utt)),
            )
            enrolled[utt] = u
    return models, enrolled, refused


def _model_phrase(model_id, ids, line, labels: Labels, utts, owner, phrases, problems):
    """The phrase id of a model's enrollment utterances, or None (with each problem)."""
    ok = True
    for utt in ids:
        if utt not in utts:
            problems.add(utt, line.where, f"not in {labels.folder / 'wav.scp'}")
            ok = False
        elif utt in owner:
            problems.add(utt, line.where, f"utterance already enrolled in {owner[utt]}")
            ok = False
        elif labels.key(utt) is None:
            problems.add(utt, line.where, f"utterance missing from {labels.missing()}")
            ok = False
    if not ok:
        return None
    keys = {utt: labels.key(utt) for utt in ids}
    if len(set(keys.values())) > 1:
        said = ", ".join(f"{utt}: {key!r}" for utt, key in keys.items())
        problems.add(model_id, line.where, f"enrollment transcripts disagree ({said})")
        return None
    key = keys[ids[0]]
    phrase_id = phrases.of(key)
    if phrase_id == FREE_TEXT_ID:
        problems.add(
            model_id,
            line.where,
            f"its phrase {key!r} is not a training phrase (seen {phrases.counts[key]} time(s) in "
            f"training; phrase_min_count is {phrases.min_count})",
        )
        return None
    return phrase_id


def read_trials(path: Path, models: dict, tests: dict, problems: Problems, refused=()):
    """Trials (``model_id``, ``test_id``, ``condition``: "" when blind), test utts, line count.

    Read column-wise (10M trials in seconds). Every line has the fields most lines have: 2 (blind),
    3 (``target|nontarget``) or 4 (and the trial type); each bad line is a problem naming it.
    Trials of a ``refused`` model (a problem of its own) are dropped without another.
    """
    try:
        frame = pd.read_csv(
            path, sep=r"\s+", header=None, names=["model_id", "test_id", "label", "condition"],
            dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig",
        )  # fmt: skip
    except UnicodeDecodeError:
        check_utf8(path)  # names the file, line and byte
        raise
    except pd.errors.ParserError as error:  # a line of more than 4 fields: pandas names it
        problems.add(str(path), str(path), f"cannot read the trials: {error}")
        return pd.DataFrame(columns=["model_id", "test_id", "condition"]), {}, 0
    frame = frame[frame["model_id"] != ""]  # blank lines (kept so that numbers are lines)
    listed = len(frame)
    frame = frame[~frame["model_id"].isin(refused)]
    where = {i: f"{path}:{i + 1}" for i in frame.index}
    fields = (frame != "").sum(axis=1)
    # The form most lines have: one unlabelled line among labelled ones is the problem, not
    # the others (and skip_bad drops it alone); a tie goes to the first line's form.
    counts = fields.value_counts()
    tied = counts.index[counts == counts.max()] if len(frame) else [2]
    expected = int(fields.iloc[0]) if len(frame) and fields.iloc[0] in tied else int(tied[0])
    bad = pd.Series(False, index=frame.index)

    def refuse(mask, reason):
        """A problem for each trial in ``mask`` not yet refused; those trials are dropped."""
        mask = mask & ~bad
        for i in frame.index[mask]:
            problems.add(f"{frame.at[i, 'model_id']} {frame.at[i, 'test_id']}", where[i], reason)
        return bad | mask

    bad = refuse(
        (fields != expected) | (fields < 2),
        f"expected {max(expected, 2)} fields, as {int((fields == expected).sum())} of the "
        f"{len(frame)} lines have (<model> <test-utt> [target|nontarget [TC|TW|IC|IW]])",
    )
    bad = refuse(~frame["model_id"].isin(models), "unknown model id (not in enroll/models)")
    bad = refuse(~frame["test_id"].isin(tests), "unknown test utterance (not in test/wav.scp)")
    if expected >= 3:
        bad = refuse(~frame["label"].isin(TARGET_LABELS), "label must be target or nontarget")
    if expected == 4:
        bad = refuse(
            ~frame["condition"].isin(LABELLED_CONDITIONS), "trial type must be TC, TW, IC or IW"
        )
        bad = refuse(
            (frame["label"] == "target") != (frame["condition"] == "TC"),
            "target type contradicts the trial type",
        )
    bad = refuse((frame["model_id"] + " " + frame["test_id"]).duplicated(), "duplicate trial")
    kept = frame[~bad]
    condition = kept["condition"]
    if expected == 3:
        condition = kept["label"].map({"target": "TC", "nontarget": "NT"})
    trials = pd.DataFrame(
        {"model_id": kept["model_id"], "test_id": kept["test_id"], "condition": condition}
    ).reset_index(drop=True)
    return trials, {t: tests[t] for t in dict.fromkeys(trials["test_id"])}, listed


def prepare_kaldi(
    data_folder,
    save_folder,
    valid_speakers: int = 20,
    seed: int = 1234,
    include_free_text: bool = False,
    skip_bad: bool = False,
    enrol_utts: int = ENROL_UTTS,
    min_seconds: float = MIN_SECONDS,
    phrase_min_count: int = PHRASE_MIN_COUNT,
    audio_outside_data_folder: bool = False,
    jobs: int | None = None,
    valid_enrol_utts: int | None = None,
) -> dict[str, Path]:
    """Validate the Kaldi-layout corpus in ``data_folder``; write the manifests to ``save_folder``.

    Returns the written CSVs by name. Raises ``DataPrepError`` naming each problem, unless
    ``skip_bad`` (then they go to rejected.csv). Does nothing if the manifests exist and were
    made from the same files with the same options.
    """
    data_folder, save_folder = Path(data_folder), Path(save_folder)
    missing = [name for name in REQUIRED if not (data_folder / name).is_file()]
    labelled = labelled_dirs(data_folder)
    if len(labelled) == 1:  # one data directory with transcripts, the other without
        missing += [name for name in TRANSCRIPTS if not name.startswith(labelled[0])]
    if missing:
        raise DataPrepError(
            f"{data_folder} is not a Kaldi-layout corpus: missing {', '.join(missing)} "
            "(see data_prep/kaldi_prepare.py)"
        )
    options = dict(
        valid_speakers=valid_speakers, seed=seed, include_free_text=include_free_text,
        skip_bad=skip_bad, enrol_utts=enrol_utts, min_seconds=min_seconds,
        phrase_min_count=phrase_min_count, outside_ok=audio_outside_data_folder,
        valid_enrol_utts=valid_enrol_utts, text_independent=not labelled,
    )  # fmt: skip
    if not labelled:
        print(
            f"{data_folder}: no transcripts (train/text, enroll/text): a text-independent corpus, "
            "one phrase; train it with phrase_branch: False and fusion: none"
        )

    def read_lists(problems: Problems) -> CorpusLists:
        """The data directories in the contract's terms (each problem recorded)."""
        seen = {}
        train, phrases = read_train(data_folder, problems, options, seen)
        models, enrolled, refused = read_enroll(data_folder, problems, options, seen, phrases)
        tests = read_audio_list(data_folder, "test", problems, options["outside_ok"], seen)
        trial_list = data_folder / "trials"
        trials, test_utts, listed = read_trials(trial_list, models, tests, problems, refused)
        official = OfficialSplit(models, enrolled, trials, test_utts, trial_list, listed)
        return CorpusLists(train, {"eval": official})

    lists = [data_folder / name for name in (*REQUIRED, *TRANSCRIPTS, *OPTIONAL)]
    fingerprint = list_fingerprint("kaldi", PREP_VERSION, data_folder, lists, options)
    return prepare_manifests(data_folder, save_folder, fingerprint, read_lists, options, jobs)


def main(argv=None) -> None:
    """Command-line entry point."""
    parser = preparer_parser(__doc__.split("\n\n")[0], "the corpus folder (train/ ...)")
    parser.add_argument("--phrase_min_count", type=int)
    parser.add_argument("--audio_outside_data_folder", action="store_true")
    run_preparer(prepare_kaldi, parser.parse_args(argv), "kaldi_prepare")


if __name__ == "__main__":
    main()
