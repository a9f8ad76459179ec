"""Turn a DeepMine / SdSV / TdSV "task1" folder into SpeechBrain CSV manifests and labelled trials.

Reads either release of task 1 (``data_prep/layout.py``, docs/design.md section 3): SdSV 2020-21
(``model_enrollment.txt`` + ``trials.txt``, five-column enrollment lines) or TdSV 2024 (a
``dev_*`` and an ``eval_*`` list pair, six-column enrollment lines with a gender column),
decided from the lists present and the enrollment list's header, and logged. Writes to
``save_folder`` the corpus contract's manifests (``data_prep/corpus.py``):

    train.csv              utterances of the training speakers (validation speakers held out)
    valid_enrol.csv, valid_enrol_utts.csv, valid_test.csv, valid_trials.csv
                           the validation split: held-out training speakers, models of the
                           evaluation's size where their repetitions allow, every model against
                           every test utterance, labelled TC/TW/IC/IW
    eval_*.csv, dev_*.csv  each official list pair (TdSV 2024's dev pair too), in the lists'
                           order; labelled only where a key is given or in docs/
    train_noise.csv        the training utterances in SpeechBrain's extended CSV format
                           (ID,duration,wav,wav_format,wav_opts), for ``AddNoise``: babble
                           made of other training speakers
    rejected.csv           with ``skip_bad``: each excluded file or line and why
    prep_options.json      the options the manifests were made with (to skip a redo), and each
                           official list's trial count (what its answer file is checked against)

The manifests are built and written by ``data_prep/manifests.py``; this module reads DeepMine's
lists. ``wav`` is written as ``$data_root/wav/...``; a free-text training line
(``free_text_id``) becomes the contract's ``FREE_TEXT_ID``; the phrase text and language come
from DeepMine's table (``layout.PHRASES``).

Everything is validated before anything is written: a folder with both releases' lists, half a
list pair or a task-2 (text-independent) enrollment list is refused at once; each list line has
its exact fields (a five-column line in a six-column file is named), each phrase id is a
pass-phrase (or the free-text id in the training list), each gender ``m`` or ``f``, each model
has ``enrol_utts`` utterances of its own, each key label agrees with its trial type, each id is
known and none is repeated: these before any audio is read. Then each referenced wav must
exist, be readable, mono, 16 kHz, whole (as long as its header says), at least ``min_seconds``
long, finite and not silent (``data_prep/audio_checks.py``). One error names every problem
(file and line); nothing partial is written. A lock on ``save_folder`` makes concurrent runs
take turns.

Usage::

    python data_prep/deepmine_prepare.py --data_folder /data/TdSV2024/task1 --save_folder prep
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.audio_checks import MIN_SECONDS
from data_prep.corpus import FREE_TEXT_ID
from data_prep.layout import FREE_TEXT_ID as LISTED_FREE_TEXT_ID
from data_prep.layout import (
    GENDERS,
    PHRASES,
    TRAIN_LIST,
    LayoutError,
    OfficialLists,
    find_release,
    phrase_language,
    wav_path,
)
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
    expect_fields,
    first_occurrence,
    in_corpus,
    list_fingerprint,
    prepare_manifests,
    preparer_parser,
    read_list,
    run_preparer,
)

PREP_VERSION = 6  # bump when the manifests change, so existing ones are redone


def deepmine_utt(file_id: str, subdir: str, where: str, spk_id="", phrase_id="") -> Utt:
    """An utterance of the layout: its file, and its phrase's text and language.

    The file is under ``wav/<subdir>/``; the text and language come from DeepMine's table.

    A free-text line's phrase becomes the contract's ``FREE_TEXT_ID`` (language "free").
    """
    return Utt(
        file_id,
        wav_path(Path("."), subdir, file_id).as_posix(),
        where,
        spk_id,
        phrase_id if phrase_id in PHRASES or not phrase_id else FREE_TEXT_ID,
        PHRASES.get(phrase_id, ""),
        phrase_language(phrase_id) if phrase_id else "",
    )


# --------------------------------------------------------------------------------------------
# Reading the docs lists
# --------------------------------------------------------------------------------------------


def _known_phrase(phrase_id: str, line: ListLine, problems: Problems, free_text_id=None) -> bool:
    """False (and a problem) unless ``phrase_id`` is a pass-phrase (or ``free_text_id``)."""
    if phrase_id in PHRASES or phrase_id == free_text_id:
        return True
    allowed = f"pass-phrases {min(PHRASES)}-{max(PHRASES)}"
    allowed += f" or {free_text_id!r} (free text)" if free_text_id else ""
    problems.add(phrase_id, line.where, f"unknown phrase id (expected {allowed})")
    return False


def read_train_labels(
    path: Path,
    include_free_text: bool,
    problems: Problems,
    free_text_id: str = LISTED_FREE_TEXT_ID,
) -> list[Utt]:
    """Training utterances with speaker and phrase; free text kept only if asked.

    A phrase id that is neither a pass-phrase nor ``free_text_id`` is an error (a mistyped ``1``
    or ``O1`` would otherwise be dropped, or trained, as free text without a word).
    """
    utts, seen = [], {}
    for line in read_list(path):
        if not expect_fields(line, 3, problems) or not first_occurrence(
            line.fields[0], seen, line, problems
        ):
            continue
        file_id, spk_id, phrase_id = line.fields
        if not _known_phrase(phrase_id, line, problems, free_text_id):
            continue
        if phrase_id in PHRASES or include_free_text:
            utts.append(deepmine_utt(file_id, "train", line.where, spk_id, phrase_id))
    return utts


def first_line(path: Path) -> ListLine | None:
    """The first non-blank line of a list (a header included); None for an empty list."""
    for line in read_list(path, header=False):
        return line
    return None


def has_gender_column(path: Path) -> bool:
    """Whether an enrollment list has TdSV 2024's gender column (six columns for 3 utterances).

    Its header names the columns (``model-id phrase-id gender enroll-file-id1 ...``); a list
    without one is read by its first line (a third field ``m`` or ``f``). A task-2
    (text-independent) enrollment list, ``model-id gender enroll-file-ids...``, is refused.
    """
    first = first_line(path)
    if first is None:
        return False
    fields = [f.lower() for f in first.fields]
    header = fields[0].endswith("-id")
    gender = ("gender",) if header else GENDERS  # the column's name, or its values
    if len(fields) > 1 and fields[1] in gender:
        raise LayoutError(
            f"{first.where}: a task-2 (text-independent) enrollment list (model-id gender "
            "enroll-file-ids...): this recipe is task 1's, text-dependent, whose models name "
            "a phrase (model-id phrase-id [gender] enroll-file-ids)"
        )
    return len(fields) > 2 and fields[2] in gender


def read_enrollment(path: Path, problems: Problems, enrol_utts: int = ENROL_UTTS):
    """Models ``{model_id: EvalModel}`` and their utterances.

    Five columns (SdSV) or six with a gender (TdSV 2024: ``has_gender_column``), the same on
    every line. Each model has exactly ``enrol_utts`` utterances (0: any number, at least one),
    says a pass-phrase, and no utterance belongs to two models.
    """
    gender = has_gender_column(path)
    lead = ["model id", "phrase id", *(["gender"] if gender else [])]
    count = f"{enrol_utts} enrollment utterance(s)" if enrol_utts else "any enrollment"
    form = "TdSV 2024's, with a gender column" if gender else "SdSV's, without a gender column"
    described = f" ({', '.join(lead)}, {count}: the list's columns are {form}; see enrol_utts)"
    models, utts, seen_models, owner = {}, {}, {}, {}
    for line in read_list(path):
        ok = expect_fields(line, len(lead) + max(enrol_utts, 1), problems, not enrol_utts,
                           described)  # fmt: skip
        if not ok or not first_occurrence(line.fields[0], seen_models, line, problems):
            continue
        model_id, phrase_id = line.fields[:2]
        sex = line.fields[2].lower() if gender else ""
        enrol_ids = line.fields[len(lead) :]
        if not _known_phrase(phrase_id, line, problems):
            continue
        if gender and sex not in GENDERS:
            problems.add(line.fields[2], line.where, f"gender must be one of {', '.join(GENDERS)}")
            continue
        shared = [f for f in enrol_ids if f in owner]
        for file_id in shared:
            problems.add(file_id, line.where, f"utterance already enrolled in {owner[file_id]}")
        if shared:
            continue
        owner.update({f: f"{model_id} ({line.where})" for f in enrol_ids})
        models[model_id] = EvalModel(phrase_id, list(enrol_ids), line.where, sex)
        for file_id in enrol_ids:
            utts[file_id] = deepmine_utt(file_id, "enrollment", line.where, "", phrase_id)
    return models, utts


def read_trials(path: Path, models: dict, problems: Problems):
    """Trials ``[(model_id, test_id, ListLine)]``, the test utterances they name, the line count."""
    trials, utts, seen = [], {}, {}
    lines = read_list(path)
    for line in lines:
        if not expect_fields(line, 2, problems):
            continue
        model_id, test_id = line.fields
        if model_id not in models:
            problems.add(model_id, line.where, "unknown model id (not in the enrollment list)")
            continue
        if not first_occurrence(f"{model_id} {test_id}", seen, line, problems):
            continue
        trials.append((model_id, test_id, line))
        if test_id not in utts:
            utts[test_id] = deepmine_utt(test_id, "evaluation", line.where)
    return trials, utts, len(lines)


def read_key(path: Path, trials: list, problems: Problems) -> dict[tuple[str, str], str]:
    """Trial conditions from a key file (``model test target|nontarget TC|TW|IC|IW``).

    The target label must agree with the trial type (target exactly for TC).
    """
    known = {(m, t) for m, t, _ in trials}
    key, seen, named = {}, {}, set()
    for line in read_list(path):
        named.add(line.fields[:2])  # a bad line is one problem, not also a trial without entry
        if not expect_fields(line, 4, problems):
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
        elif first_occurrence(" ".join(pair), seen, line, problems):
            key[pair] = condition
    for model_id, test_id, line in trials:
        if (model_id, test_id) not in named:
            problems.add(f"{model_id} {test_id}", line.where, f"trial has no entry in {path}")
    return key


def read_trial_lists(trial_list: Path, key_list, models: dict, problems: Problems):
    """Trials (``model_id``, ``test_id``, ``condition``: "" without a key), tests, line count.

    A well-formed pair of lists (the usual case) is read and checked column-wise by pandas: 10M
    trials in seconds, where reading them line by line took minutes
    (``tests/benchmarks/bench_scale.py``). Any irregular line sends both lists through the
    line-by-line readers, whose messages name each bad line.
    """
    fast = _well_formed_trials(trial_list, key_list, models)
    if fast is not None:
        return (*fast, len(fast[0]))
    trials, test_utts, listed = read_trials(trial_list, models, problems)
    key = read_key(key_list, trials, problems) if key_list else {}
    frame = pd.DataFrame([t[:2] for t in trials], columns=["model_id", "test_id"], dtype=str)
    frame["condition"] = [key.get(t[:2], "") for t in trials]
    return frame, test_utts, listed


def _list_columns(path: Path, names: list[str]):
    """``(columns, header lines)`` of a list whose lines all have exactly the fields ``names``.

    Single-space separated; None when any line does not fit (a blank line included).
    """
    try:
        frame = pd.read_csv(
            path, sep=" ", header=None, names=[*names, "_extra"], dtype=str, quoting=csv.QUOTE_NONE,
            encoding="utf-8-sig", keep_default_na=False, skip_blank_lines=False, engine="c",
        )  # fmt: skip
    except UnicodeDecodeError:
        check_utf8(path)  # names the file, line and byte
        raise
    except pd.errors.ParserError:
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
        test_ids[i]: deepmine_utt(test_ids[i], "evaluation", f"{trial_list}:{i + 1 + header}")
        for i in first
    }
    return trials, test_utts


# --------------------------------------------------------------------------------------------
# Preparing
# --------------------------------------------------------------------------------------------
def prepare_deepmine(
    data_folder,
    save_folder,
    valid_speakers: int = 20,
    seed: int = 1234,
    include_free_text: bool = False,
    skip_bad: bool = False,
    jobs: int | None = None,
    enrol_utts: int = ENROL_UTTS,
    min_seconds: float = MIN_SECONDS,
    free_text_id: str = LISTED_FREE_TEXT_ID,
    valid_enrol_utts: int | None = None,
    eval_key_file=None,
    dev_key_file=None,
) -> dict[str, Path]:
    """Validate the corpus in ``data_folder`` and write the manifests to ``save_folder``.

    Returns the paths of the written CSVs by name (``train``, ``valid_trials``, ...). Raises
    ``DataPrepError`` naming each problem, unless ``skip_bad`` (then they go to rejected.csv);
    a folder that is no task-1 release (``layout.find_release``, ``has_gender_column``) is
    refused whatever ``skip_bad``. ``eval_key_file`` / ``dev_key_file`` label an official split
    (default: ``docs/<prefix>trials_key.txt`` where present; otherwise it is scored blind).
    Does nothing if the manifests exist and were made from the same lists with the same
    options. Holds a lock on ``save_folder`` meanwhile: concurrent runs take turns. ``jobs``
    threads read the audio (default: one per CPU core; more pay off only on network storage).
    """
    data_folder, save_folder = Path(data_folder), Path(save_folder)
    docs = data_folder / "docs"
    train_list = docs / TRAIN_LIST
    if not train_list.is_file():
        raise DataPrepError(f"{train_list} not found: is {data_folder} a DeepMine task1 folder?")
    try:
        release = find_release(docs, {"eval": eval_key_file, "dev": dev_key_file})
        for lists in release.splits.values():
            has_gender_column(lists.enrollment)  # a task-2 list: refused before anything
    except LayoutError as error:
        raise DataPrepError(str(error)) from None
    print(f"{data_folder}: {release.describe()}")
    docs_files = [train_list, *(p for lists in release.splits.values() for p in lists if p)]
    options = dict(
        valid_speakers=valid_speakers, seed=seed, include_free_text=include_free_text,
        skip_bad=skip_bad, enrol_utts=enrol_utts, min_seconds=min_seconds,
        free_text_id=free_text_id, valid_enrol_utts=valid_enrol_utts,
        keys={split: in_corpus(lists.key, data_folder) if lists.key else None
              for split, lists in release.splits.items()},
    )  # fmt: skip
    fingerprint = list_fingerprint("deepmine", PREP_VERSION, data_folder, docs_files, options)

    def read_lists(problems: Problems) -> CorpusLists:
        """DeepMine's lists in the contract's terms (each problem recorded)."""
        train = read_train_labels(train_list, include_free_text, problems, free_text_id)
        official = {
            split: read_official(lists, problems, enrol_utts)
            for split, lists in release.splits.items()
        }
        return CorpusLists(train, official)

    return prepare_manifests(data_folder, save_folder, fingerprint, read_lists, options, jobs)


def read_official(lists: OfficialLists, problems: Problems, enrol_utts: int) -> OfficialSplit:
    """One official list pair (enrollment, trials and its key, if any) in the contract's terms."""
    models, enrolled = read_enrollment(lists.enrollment, problems, enrol_utts)
    trials, test_utts, listed = read_trial_lists(lists.trials, lists.key, models, problems)
    return OfficialSplit(models, enrolled, trials, test_utts, lists.trials, listed)


def main(argv=None) -> None:
    """Command-line entry point."""
    parser = preparer_parser(__doc__.split("\n\n")[0], "the task1 folder (docs/ and wav/)")
    for split in ("eval", "dev"):
        parser.add_argument(
            f"--{split}_key_file",
            help=f"key of the official {split} trials (default: docs/<prefix>trials_key.txt)",
        )
    parser.add_argument("--free_text_id", help="phrase id of free-text training lines")
    run_preparer(prepare_deepmine, parser.parse_args(argv), "deepmine_prepare")


if __name__ == "__main__":
    main()
