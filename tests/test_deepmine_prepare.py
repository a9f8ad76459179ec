"""The DeepMine preparer: both releases, the validation split, labels, each kind of bad input."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from data_prep.deepmine_prepare import prepare_deepmine
from data_prep.layout import PHRASES, phrase_language
from data_prep.manifests import DataPrepError, read_list
from tests.conftest import TDSV2024_LISTS, TINY, make_miniature, write_wav

UTT_COLUMNS = ["ID", "duration", "wav", "spk_id", "phrase_id", "phrase", "language"]


def _csv(folder, name):
    return pd.read_csv(folder / name, dtype=str, keep_default_na=False)


def test_manifests_of_the_synthetic_corpus(tiny_corpus, tmp_path):
    out = prepare_deepmine(tiny_corpus, tmp_path / "prep", valid_speakers=2, jobs=4)
    train, valid_test = (
        _csv(tmp_path / "prep", "train.csv"),
        _csv(tmp_path / "prep", "valid_test.csv"),
    )
    valid_enrol_utts = _csv(tmp_path / "prep", "valid_enrol_utts.csv")
    assert list(train.columns) == UTT_COLUMNS
    assert train.wav.str.startswith("$data_root/wav/train/trn_").all()
    assert (train.duration.astype(float) > 0.5).all()
    assert set(train.language) == {"persian", "english"}
    assert (train.phrase == train.phrase_id.map(PHRASES)).all()
    # Speaker-disjoint validation split; nothing lost, nothing counted twice.
    valid_speakers = set(valid_test.spk_id) | set(valid_enrol_utts.spk_id)
    assert len(valid_speakers) == 2 and valid_speakers.isdisjoint(set(train.spk_id))
    all_ids = list(train.ID) + list(valid_test.ID) + list(valid_enrol_utts.ID)
    assert len(all_ids) == len(set(all_ids)) == TINY["speakers"] * len(PHRASES) * TINY["reps"]
    # Models: 3 enrollment utterances of one speaker saying the model's phrase.
    models = _csv(tmp_path / "prep", "valid_enrol.csv")
    assert list(models.columns) == [
        "model_id", "phrase_id", "spk_id", "enrol_ids", "language", "gender"
    ]  # fmt: skip
    assert len(models) == 2 * len(PHRASES)
    assert (models.language == models.phrase_id.map(phrase_language)).all()
    utt = valid_enrol_utts.set_index("ID")
    for model in models.itertuples():
        ids = model.enrol_ids.split(" ")
        assert len(ids) == 3
        assert set(utt.loc[ids, "spk_id"]) == {model.spk_id}
        assert set(utt.loc[ids, "phrase_id"]) == {model.phrase_id}
    _check_valid_trial_labels(tmp_path / "prep", models, valid_test)
    assert set(out) >= {"train", "valid_trials", "eval_trials"}


def _check_valid_trial_labels(folder, models, valid_test):
    """Every label is right against the speaker and phrase of both sides."""
    trials = _csv(folder, "valid_trials.csv")
    assert list(trials.columns) == ["model_id", "test_id", "label", "condition"]
    side_m = models.set_index("model_id").loc[trials.model_id]
    side_t = valid_test.set_index("ID").loc[trials.test_id]
    same_spk = side_m.spk_id.to_numpy() == side_t.spk_id.to_numpy()
    same_phr = side_m.phrase_id.to_numpy() == side_t.phrase_id.to_numpy()
    expected = np.where(same_spk, "T", "I").astype(object) + np.where(same_phr, "C", "W")
    assert (trials.condition.to_numpy() == expected).all()
    assert (trials.label == (trials.condition == "TC").astype(int).astype(str)).all()
    assert set(trials.condition) == {"TC", "TW", "IC", "IW"}
    assert len(trials) == len(models) * len(valid_test)


def test_eval_manifests_follow_the_official_lists_and_key(tiny_corpus, tmp_path):
    prepare_deepmine(tiny_corpus, tmp_path / "prep", valid_speakers=2)
    trials = _csv(tmp_path / "prep", "eval_trials.csv")
    key = [line.fields for line in read_list(tiny_corpus / "docs" / "trials_key.txt")]
    assert [list(r) for r in trials[["model_id", "test_id", "condition"]].values] == [
        [k[0], k[1], k[3]] for k in key
    ]
    tests = _csv(tmp_path / "prep", "eval_test.csv")
    assert set(tests.ID) == set(trials.test_id)
    assert tests.wav.str.startswith("$data_root/wav/evaluation/").all()
    enrol = _csv(tmp_path / "prep", "eval_enrol.csv")
    assert len(enrol) == TINY["eval_speakers"] * len(PHRASES)


def test_the_sdsv_release(tmp_path, capsys):
    root = make_miniature(tmp_path / "corpus", "sdsv")
    prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    assert "SdSV 2020-21 layout; eval: model_enrollment.txt + trials.txt" in capsys.readouterr().out
    train = _csv(tmp_path / "prep", "train.csv")
    assert len(train) == 3 * 2 * 4 and "FT" not in set(train.phrase_id)
    assert len(_csv(tmp_path / "prep", "valid_enrol.csv")) == 2
    trials = _csv(tmp_path / "prep", "eval_trials.csv")
    assert list(trials.test_id) == ["evl_000001", "evl_000002", "evl_000003"]
    assert list(trials.condition) == ["TC", "IC", "TW"] and list(trials.label) == ["1", "0", "0"]
    enrol_utts = _csv(tmp_path / "prep", "eval_enrol_utts.csv")
    assert list(enrol_utts.phrase_id) == ["01"] * 3 + ["06"] * 3
    assert set(_csv(tmp_path / "prep", "eval_enrol.csv").gender) == {""}  # five columns
    assert not (tmp_path / "prep" / "dev_trials.csv").exists()


def test_the_tdsv2024_release_as_its_plan_lays_it_out(tmp_path, capsys):
    """Six-column lists and both pairs, each a split of its own in its list's order; no key."""
    root = make_miniature(tmp_path / "corpus", "tdsv2024")
    prep = tmp_path / "prep"
    prepare_deepmine(root, prep, valid_speakers=1)
    out = capsys.readouterr().out
    assert "TdSV 2024 layout; dev: dev_model_enrollment.txt + dev_trials.txt (no key" in out
    assert "eval: eval_model_enrollment.txt + eval_trials.txt (no key: scored blind)" in out
    for split in ("dev", "eval"):
        lines = [line.split() for line in TDSV2024_LISTS[f"{split}_trials.txt"][1:]]
        trials = _csv(prep, f"{split}_trials.csv")
        assert trials[["model_id", "test_id"]].values.tolist() == lines
        assert set(trials.condition) == {""} and set(trials.label) == {""}  # blind
        models = [line.split() for line in TDSV2024_LISTS[f"{split}_model_enrollment.txt"][1:]]
        enrol = _csv(prep, f"{split}_enrol.csv")
        assert enrol[["model_id", "phrase_id", "gender"]].values.tolist() == [m[:3] for m in models]
        assert enrol.enrol_ids.tolist() == [" ".join(m[3:]) for m in models]
        tests = _csv(prep, f"{split}_test.csv")
        assert tests.wav.str.startswith("$data_root/wav/evaluation/evl_").all()
    record = json.loads((prep / "prep_options.json").read_text())["official"]
    assert {s: (r["listed_trials"], r["kept_trials"]) for s, r in record.items()} == {
        "dev": (2, 2), "eval": (3, 3)
    }  # fmt: skip
    assert len(_csv(prep, "valid_enrol.csv")) == 2  # the validation split as ever


def test_a_key_per_official_split_labels_it(tmp_path):
    root = make_miniature(tmp_path / "corpus", "tdsv2024")
    key = tmp_path / "keys" / "eval_trials_key.txt"  # as the challenge kept them: outside docs/
    key.parent.mkdir()
    key.write_text(
        "model-id evaluation-file-id target-type trial-type\n"
        "eval_model_000001 evl_000122 target TC\n"
        "eval_model_000002 evl_000123 nontarget IC\n"
        "eval_model_000001 evl_000123 nontarget TW\n"
    )
    prepare_deepmine(root, tmp_path / "prep", valid_speakers=1, eval_key_file=key)
    assert _csv(tmp_path / "prep", "eval_trials.csv").condition.tolist() == ["TC", "IC", "TW"]
    assert set(_csv(tmp_path / "prep", "dev_trials.csv").condition) == {""}
    with pytest.raises(DataPrepError, match=r"dev_key_file .*missing.txt not found"):
        prepare_deepmine(root, tmp_path / "p2", dev_key_file=tmp_path / "missing.txt")
    sdsv = make_miniature(tmp_path / "sdsv", "sdsv")
    with pytest.raises(DataPrepError, match=r"dev_key_file .*: .* has no dev list pair"):
        prepare_deepmine(sdsv, tmp_path / "p3", valid_speakers=1, dev_key_file=key)


def _no_audio_read(monkeypatch):
    """Make reading any audio fail the test: what is refused must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("audio was read")

    monkeypatch.setattr("data_prep.manifests.check_audio", refuse)


def _append(path, line):
    path.write_text(path.read_text() + line + "\n")


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda root: (root / "docs" / "model_enrollment.txt").write_text(
                "model-id phrase-id enroll-file-id1 enroll-file-id2 enroll-file-id3\n"
            ),
            r"holds the lists of two releases \(SdSV 2020-21: model_enrollment\.txt; TdSV 2024: "
            r"dev_model_enrollment\.txt, dev_trials\.txt, eval_model_enrollment\.txt",
        ),
        (
            lambda root: (root / "docs" / "eval_trials.txt").unlink(),
            r"eval_model_enrollment\.txt has no eval_trials\.txt beside it",
        ),
        (
            lambda root: _append(
                root / "docs" / "eval_model_enrollment.txt",
                "eval_model_000003 07 enr_000007 enr_000008 enr_000009",
            ),
            r"eval_model_enrollment\.txt:4: eval_model_000003 07 enr_000007 enr_000008 "
            r"enr_000009: expected 6 fields \(model id, phrase id, gender, 3 enrollment",
        ),
        (
            lambda root: _append(
                root / "docs" / "dev_model_enrollment.txt",
                "dev_model_000002 06 x enr_000007 enr_000008 enr_000009",
            ),
            r"dev_model_enrollment\.txt:3: x: gender must be one of m, f",
        ),
        (
            lambda root: (root / "docs" / "eval_model_enrollment.txt").write_text(
                "model-id gender enroll-file-ids\neval_model_000001 m enr_036529 enr_036530\n"
            ),
            r"eval_model_enrollment\.txt:1: a task-2 \(text-independent\) enrollment list",
        ),
        (
            lambda root: (root / "docs" / "dev_model_enrollment.txt").write_text(
                "dev_model_000001 f enr_000001 enr_000002 enr_000003 enr_000004\n"
            ),
            r"dev_model_enrollment\.txt:1: a task-2 \(text-independent\) enrollment list",
        ),
    ],
    ids=["both_releases", "half_a_pair", "five_columns_in_six", "gender", "task2", "task2_bare"],
)
def test_a_folder_that_is_no_task1_release_is_refused_before_any_audio(
    tmp_path, monkeypatch, damage, message
):
    root = make_miniature(tmp_path / "corpus", "tdsv2024")
    damage(root)
    _no_audio_read(monkeypatch)
    with pytest.raises(DataPrepError, match=message):
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    assert not (tmp_path / "prep").exists() or not list((tmp_path / "prep").iterdir())


def test_the_validation_models_fit_the_repetitions(tmp_path, capsys):
    """4 repetitions per phrase: models of the evaluation's size where they fit, else fewer."""
    root = make_miniature(tmp_path / "corpus")
    for i in range(1, 7):  # the official models have 4 utterances here
        write_wav(root / "wav" / "enrollment" / f"enr_{i + 6:06d}.wav", seed=300 + i)
    enrol = root / "docs" / "model_enrollment.txt"
    enrol.write_text(
        "model-id phrase-id enroll-file-id1 enroll-file-id2 enroll-file-id3 enroll-file-id4\n"
        "model_00000 01 enr_000001 enr_000002 enr_000003 enr_000007\n"
        "model_00001 06 enr_000004 enr_000005 enr_000006 enr_000008\n"
    )
    prep = tmp_path / "prep"
    prepare_deepmine(root, prep, valid_speakers=2, enrol_utts=4)
    out = capsys.readouterr().out
    assert "the evaluation's models have 4, but the held-out speakers say a pass-phrase 4 " in out
    models = _csv(prep, "valid_enrol.csv")
    assert len(models) == 4 and set(models.enrol_ids.str.split().map(len)) == {3}
    trials = _csv(prep, "valid_trials.csv")
    assert set(trials.condition) == {"TC", "TW", "IC", "IW"}
    prepare_deepmine(root, prep, valid_speakers=2, enrol_utts=4, valid_enrol_utts=2)
    assert set(_csv(prep, "valid_enrol.csv").enrol_ids.str.split().map(len)) == {2}
    with pytest.raises(DataPrepError, match=r"no model: a model needs 4 enrollment .* at most 4"):
        prepare_deepmine(root, tmp_path / "p2", valid_speakers=2, enrol_utts=4, valid_enrol_utts=4)


def test_a_corpus_without_any_possible_validation_model_is_refused(tmp_path):
    root = make_miniature(tmp_path / "corpus")
    labels = root / "docs" / "train_labels.txt"
    lines = labels.read_text().splitlines()
    seen, kept = set(), lines[:1]
    for line in lines[1:]:  # each speaker says each phrase once
        spk_phrase = tuple(line.split()[1:])
        if spk_phrase not in seen:
            seen.add(spk_phrase)
            kept.append(line)
    labels.write_text("\n".join(kept) + "\n")
    with pytest.raises(DataPrepError, match=r"say a pass-phrase at most 1 time.*valid_enrol_utts"):
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=2)
    assert not (tmp_path / "prep" / "train.csv").exists()


def test_free_text_kept_only_when_asked(tmp_path):
    root = make_miniature(tmp_path / "corpus")
    prepare_deepmine(root, tmp_path / "prep", valid_speakers=1, include_free_text=True)
    train, dev = _csv(tmp_path / "prep", "train.csv"), _csv(tmp_path / "prep", "valid_test.csv")
    assert "FT" in set(train.phrase_id) | set(dev.phrase_id)
    assert "FT" not in set(_csv(tmp_path / "prep", "valid_enrol.csv").phrase_id)
    # A held-out speaker's free text (seed 3 holds out spk_000001, who says it) is a
    # wrong-phrase test of every validation model (TW or IW).
    prepare_deepmine(root, tmp_path / "prep3", valid_speakers=2, seed=3, include_free_text=True)
    dev = _csv(tmp_path / "prep3", "valid_test.csv")
    trials = _csv(tmp_path / "prep3", "valid_trials.csv")
    free_tests = set(dev.ID[dev.phrase_id == "FT"])
    assert free_tests == {"trn_000099"}
    free_trials = trials[trials.test_id.isin(free_tests)]
    assert len(free_trials) == len(_csv(tmp_path / "prep3", "valid_enrol.csv"))
    assert set(free_trials.condition) == {"TW", "IW"}


def _break_missing(root):
    (root / "wav/train/trn_000003.wav").unlink()
    return "trn_000003.wav", "missing file", "train_labels.txt:4"


def _break_empty(root):
    sf.write(root / "wav/train/trn_000004.wav", np.zeros(0), 16000)
    return "trn_000004.wav", "empty audio", "train_labels.txt:5"


def _break_rate(root):
    write_wav(root / "wav/enrollment/enr_000002.wav", rate=8000)
    return "enr_000002.wav", "sample rate 8000 Hz", "model_enrollment.txt:2"


def _break_stereo(root):
    write_wav(root / "wav/evaluation/evl_000003.wav", channels=2)
    return "evl_000003.wav", "2 channels", "trials.txt:4"


def _break_header(root):
    (root / "wav/train/trn_000005.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    return "trn_000005.wav", "unreadable audio", "train_labels.txt:6"


def _break_unknown_model(root):
    with open(root / "docs/trials.txt", "a") as handle:
        handle.write("model_00042 evl_000001\n")
    return "model_00042", "unknown model id", "trials.txt:5"


def _break_duplicate(root):
    with open(root / "docs/train_labels.txt", "a") as handle:
        handle.write("trn_000002 spk_000003 06\n")
    return "trn_000002", "duplicate id (first at", "train_labels.txt:35"


def _break_truncated(root):
    path = root / "wav/train/trn_000007.wav"
    write_wav(path, seconds=3.0)
    path.write_bytes(path.read_bytes()[: 44 + 2 * 16000])  # the header still says 3 s
    return "trn_000007.wav", "truncated: the header declares 3.000 s", "train_labels.txt:8"


def _break_silent(root):
    sf.write(root / "wav/train/trn_000008.wav", np.zeros(16000), 16000, subtype="PCM_16")
    return "trn_000008.wav", "no speech energy", "train_labels.txt:9"


def _break_nonfinite(root):
    samples = np.random.default_rng(0).uniform(-0.1, 0.1, 16000).astype(np.float32)
    samples[8000] = np.nan
    sf.write(root / "wav/train/trn_000009.wav", samples, 16000, subtype="FLOAT")
    return "trn_000009.wav", "1 non-finite sample(s) (NaN or inf), the first at 0.500 s", ":10"


def _break_short(root):
    write_wav(root / "wav/train/trn_000010.wav", seconds=0.01)
    return "trn_000010.wav", "too short (0.010 s, minimum 0.3 s)", "train_labels.txt:11"


def _list_edit(name, docs_list, old, new, culprit, reason, where):
    """A breakage that edits one docs list: ``old`` replaced by ``new`` (None: ``new`` appended)."""

    def breakage(root):
        path = root / "docs" / docs_list
        text = path.read_text()
        path.write_text(text + new + "\n" if old is None else text.replace(old, new))
        return culprit, reason, where

    breakage.__name__ = f"_break_{name}"
    return breakage


LIST_BREAKAGES = [
    _list_edit("trial_fields", "trials.txt", None, "model_00000 evl_000003 target",
               "model_00000 evl_000003 target", "expected 2 fields", "trials.txt:5"),
    _list_edit("enrol_count", "model_enrollment.txt", None, "model_00002 06 enr_000007 enr_000008",
               "model_00002 06", "expected 5 fields (model id, phrase id, 3 enrollment", ":4"),
    _list_edit("shared_enrollment", "model_enrollment.txt", None,
               "model_00003 01 enr_000009 enr_000003 enr_000010",
               "enr_000003", "already enrolled in model_00000", "model_enrollment.txt:4"),
    _list_edit("model_phrase", "model_enrollment.txt", None,
               "model_00004 11 enr_000011 enr_000012 enr_000013",
               "11", "unknown phrase id (expected pass-phrases 01-10)", "model_enrollment.txt:4"),
    _list_edit("train_phrase", "train_labels.txt", None, "trn_000100 spk_000002 O1", "O1",
               "unknown phrase id (expected pass-phrases 01-10 or 'FT'", "train_labels.txt:35"),
    _list_edit("key_label", "trials_key.txt", "evl_000002 nontarget IC", "evl_000002 target IC",
               "target IC", "target type contradicts the trial type", "trials_key.txt:3"),
    _list_edit("key_fields", "trials_key.txt", "evl_000003 nontarget TW", "evl_000003 TW",
               "model_00001 evl_000003 TW", "expected 4 fields", "trials_key.txt:4"),
]  # fmt: skip


AUDIO_BREAKAGES = [
    _break_missing,
    _break_empty,
    _break_rate,
    _break_stereo,
    _break_header,
    _break_truncated,
    _break_silent,
    _break_nonfinite,
    _break_short,
]


def _break_trials_encoding(root):
    path = root / "docs/trials.txt"  # read column-wise by pandas
    path.write_bytes(path.read_bytes() + "model_00000 évl_000003\n".encode("latin-1"))
    return "not UTF-8 (byte 0xe9)", "iconv -f CP1256 -t UTF-8", "trials.txt:5"


def _break_labels_encoding(root):
    path = root / "docs/train_labels.txt"  # read line by line
    path.write_bytes(path.read_bytes() + "trn_000100 spk_000002 کن\n".encode("cp1256"))
    return f"not UTF-8 (byte 0x{'ک'.encode('cp1256').hex()})", "iconv", "train_labels.txt:35"


LIST_BREAKAGES += [_break_unknown_model, _break_duplicate]
#: A list that cannot be decoded stops data prep at once: its lines cannot be checked one by one.
ENCODING_BREAKAGES = [_break_trials_encoding, _break_labels_encoding]
BREAKAGES = AUDIO_BREAKAGES + LIST_BREAKAGES + ENCODING_BREAKAGES


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__[7:])
def test_bad_input_names_the_culprit_and_writes_nothing(tmp_path, breakage):
    root = make_miniature(tmp_path / "corpus")
    culprit, reason, where = breakage(root)
    with pytest.raises(DataPrepError) as error:
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    message = str(error.value)
    assert culprit in message and reason in message and where in message, message
    assert not list((tmp_path / "prep").glob("*")) if (tmp_path / "prep").exists() else True


@pytest.mark.parametrize("kind", ["lists", "audio"])
def test_every_problem_is_reported_at_once(tmp_path, monkeypatch, kind):
    """Every bad list line at once, before any audio is read; then every bad file at once."""
    root = make_miniature(tmp_path / "corpus")
    breakages = LIST_BREAKAGES if kind == "lists" else AUDIO_BREAKAGES
    culprits = [breakage(root)[0] for breakage in breakages]
    if kind == "lists":
        _no_audio_read(monkeypatch)
    with pytest.raises(DataPrepError) as error:
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    assert all(c in str(error.value) for c in culprits)
    assert str(error.value).startswith(f"{len(breakages)} problem(s)")


def test_an_id_is_a_file_name_never_a_path(tmp_path):
    """An id that would read a file outside the corpus, or fail inside a thread pool, is named.

    Each with its list line, for each list an id comes from; the files outside exist.
    """
    root = make_miniature(tmp_path / "corpus")
    write_wav(tmp_path / "outside" / "secret.wav")  # what ../../../outside/secret would read
    labels = root / "docs" / "train_labels.txt"
    labels.write_text(labels.read_text() + "../../../outside/secret spk_000002 01\n")
    enrol = root / "docs" / "model_enrollment.txt"
    enrol.write_text(enrol.read_text().replace("enr_000006", f"{tmp_path}/outside/secret"))
    long_id = "e" * 300
    for name in ("trials.txt", "trials_key.txt"):
        path = root / "docs" / name
        path.write_text(path.read_text().replace("evl_000003", long_id))
    with pytest.raises(DataPrepError) as error:
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    message = str(error.value)
    for culprit, reason, where in (
        ("'../../../outside/secret'", "no path separators", "train_labels.txt:35"),
        (f"'{tmp_path}/outside/secret'", "no path separators", "model_enrollment.txt:3"),
        (f"'{long_id}'", "too long for a file name (304 bytes", "trials.txt:4"),
    ):
        line = next((x for x in message.splitlines() if culprit in x), "")
        assert reason in line and where in line, message
    assert not (tmp_path / "prep").exists() or not list((tmp_path / "prep").iterdir())


def test_key_must_cover_every_trial(tmp_path):
    root = make_miniature(tmp_path / "corpus")
    key = root / "docs/trials_key.txt"
    key.write_text("\n".join(key.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataPrepError, match=r"model_00001 evl_000003: trial has no entry"):
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    # Skipped instead: that trial goes, and the others keep their labels (not a blind split).
    prepare_deepmine(root, tmp_path / "prep", valid_speakers=1, skip_bad=True)
    trials = _csv(tmp_path / "prep", "eval_trials.csv").to_dict("records")
    assert len(trials) == 2 and all(t["condition"] and t["label"] for t in trials)
    assert ("model_00001", "evl_000003") not in {(t["model_id"], t["test_id"]) for t in trials}
    assert "trial has no entry" in (tmp_path / "prep" / "rejected.csv").read_text()


def test_skip_bad_excludes_and_lists_them(tmp_path):
    root = make_miniature(tmp_path / "corpus")
    _break_missing(root)
    _break_stereo(root)
    for i in (4, 5, 6):  # model_00001 loses all its enrollment audio
        (root / f"wav/enrollment/enr_{i:06d}.wav").unlink()
    prepare_deepmine(root, tmp_path / "prep", valid_speakers=1, skip_bad=True)
    rejected = _csv(tmp_path / "prep", "rejected.csv")
    assert len(rejected) == 6
    assert any(item == "model_00001" for item in rejected["item"])
    ids = set(_csv(tmp_path / "prep", "train.csv").ID) | set(
        _csv(tmp_path / "prep", "valid_test.csv").ID
    )
    ids |= set(_csv(tmp_path / "prep", "valid_enrol_utts.csv").ID)
    assert "trn_000003" not in ids and len(ids) == 4 * 2 * 4 - 1
    trials = _csv(tmp_path / "prep", "eval_trials.csv")
    assert list(trials.test_id) == ["evl_000001", "evl_000002"]


def test_skips_work_when_up_to_date_and_redoes_on_change(tmp_path, capsys):
    root = make_miniature(tmp_path / "corpus")
    prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    capsys.readouterr()
    prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    assert "skipping data prep" in capsys.readouterr().out
    prepare_deepmine(root, tmp_path / "prep", valid_speakers=2)
    assert "Wrote manifests" in capsys.readouterr().out
    assert len(_csv(tmp_path / "prep", "valid_enrol.csv")) == 4
    # A deleted or edited manifest, or a damaged marker, is prepared again, never skipped.
    for damage in (
        lambda prep: (prep / "eval_trials.csv").unlink(),
        lambda prep: (prep / "train.csv").write_text("ID,duration\n"),
        lambda prep: (prep / "prep_options.json").write_text('{"options": {"dev_sp'),
    ):
        damage(tmp_path / "prep")
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=2)
        out = capsys.readouterr().out
        assert "Wrote manifests" in out and "preparing again" in out, out
        assert (tmp_path / "prep" / "eval_trials.csv").is_file()
        assert len(_csv(tmp_path / "prep", "train.csv")) > 1


def test_replaced_audio_is_prepared_again_and_changes_the_audio_identity(tmp_path, capsys):
    """Manifests carry their audio's identity (a hash of the samples), checked by file stats."""
    root = make_miniature(tmp_path / "corpus")
    prep = tmp_path / "prep"

    def identity():
        """The audio's identity that data prep recorded (compared by a run's resume guard)."""
        return json.loads((prep / "prep_options.json").read_text())["audio"]

    prepare_deepmine(root, prep, valid_speakers=1)
    first = identity()
    assert first["files"] == len(_csv(prep, "train.csv")) + len(_csv(prep, "eval_test.csv")) + (
        len(_csv(prep, "valid_test.csv")) + len(_csv(prep, "valid_enrol_utts.csv"))
        + len(_csv(prep, "eval_enrol_utts.csv"))
    )  # fmt: skip
    capsys.readouterr()
    # Another recording under the same name and of the same length: same manifests, other data.
    write_wav(root / "wav/train/trn_000002.wav", seed=99)
    prepare_deepmine(root, prep, valid_speakers=1)
    out = capsys.readouterr().out
    assert "Audio changed since data prep" in out and "Wrote manifests" in out, out
    assert identity()["content"] != first["content"]
    # The same samples again (a copy, with new file times): prepared again, the same identity.
    write_wav(root / "wav/train/trn_000002.wav", seed=2)  # as make_miniature wrote it
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)  # copytree keeps times: touch every file
    for wav in moved.rglob("*.wav"):
        wav.touch()
    prepare_deepmine(moved, prep, valid_speakers=1)
    assert identity()["content"] == first["content"]


def test_valid_speakers_must_leave_training_speakers(tmp_path):
    root = make_miniature(tmp_path / "corpus")
    with pytest.raises(DataPrepError, match="only 4 speakers"):
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=4)


def test_cli_reports_problems_and_exits_nonzero(tmp_path):
    root = make_miniature(tmp_path / "corpus")
    _break_missing(root)
    result = subprocess.run(
        [
            sys.executable,
            "data_prep/deepmine_prepare.py",
            "--data_folder",
            str(root),
            "--save_folder",
            str(tmp_path / "prep"),
            "--valid_speakers",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "trn_000003.wav: missing file" in result.stderr


def test_not_a_corpus_folder(tmp_path):
    with pytest.raises(DataPrepError, match=r"train_labels\.txt not found"):
        prepare_deepmine(tmp_path, tmp_path / "prep")
    shutil.rmtree(tmp_path / "prep", ignore_errors=True)


def test_a_byte_order_mark_is_not_part_of_an_id(tmp_path):
    root = make_miniature(tmp_path / "corpus")
    for name in ("trials.txt", "model_enrollment.txt"):  # headerless, as some tools write them
        path = root / "docs" / name
        path.write_text("\ufeff" + "\n".join(path.read_text().splitlines()[1:]) + "\n")
    prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    trials = _csv(tmp_path / "prep", "eval_trials.csv")
    assert list(trials.model_id) == ["model_00000", "model_00000", "model_00001"]


def test_any_enrollment_count_when_allowed(tmp_path):
    root = make_miniature(tmp_path / "corpus")
    with open(root / "docs" / "model_enrollment.txt", "a") as handle:
        handle.write("model_00002 06 enr_000001\n")
    with pytest.raises(DataPrepError, match="3 enrollment utterance"):
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=1)
    # Allowed, the shared utterance is still an error: one file, one model.
    with pytest.raises(DataPrepError, match="enr_000001: utterance already enrolled"):
        prepare_deepmine(root, tmp_path / "prep", valid_speakers=1, enrol_utts=0)


def test_concurrent_runs_take_turns_and_leave_no_temporary_files(tmp_path):
    root = make_miniature(tmp_path / "corpus")
    prep = tmp_path / "prep"
    commands = [
        [sys.executable, "data_prep/deepmine_prepare.py", "--data_folder", str(root),
         "--save_folder", str(prep), "--valid_speakers", str(n)]
        for n in (1, 2)
    ]  # fmt: skip
    runs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    outputs = [run.communicate()[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert not list(prep.glob(".*")), list(prep.glob(".*"))
    # Whichever ran last, the folder holds its complete output, consistent with its marker.
    valid_speakers = json.loads((prep / "prep_options.json").read_text())["options"][
        "valid_speakers"
    ]
    assert len(_csv(prep, "valid_enrol.csv")) == 2 * valid_speakers


def test_a_failed_write_leaves_the_previous_manifests(tmp_path, monkeypatch):
    root = make_miniature(tmp_path / "corpus")
    prep = tmp_path / "prep"
    prepare_deepmine(root, prep, valid_speakers=1)
    before = {p.name: p.read_bytes() for p in prep.iterdir()}

    writers = []

    def writer_on_a_filling_disk(handle):
        writers.append(handle)
        if len(writers) == 3:  # two manifests are written, the third finds the disk full
            raise OSError(28, "No space left on device")
        return real_writer(handle)

    real_writer = csv.writer
    monkeypatch.setattr(csv, "writer", writer_on_a_filling_disk)
    with pytest.raises(OSError, match="No space"):
        prepare_deepmine(root, prep, valid_speakers=2)
    assert {p.name: p.read_bytes() for p in prep.iterdir()} == before


def test_column_wise_trial_reading_equals_the_line_by_line_reader(
    tiny_corpus, tmp_path, monkeypatch
):
    fast = prepare_deepmine(tiny_corpus, tmp_path / "fast", valid_speakers=2)
    monkeypatch.setattr("data_prep.deepmine_prepare._well_formed_trials", lambda *args: None)
    slow = prepare_deepmine(tiny_corpus, tmp_path / "slow", valid_speakers=2)
    for name in ("eval_trials", "eval_test", "eval_enrol", "eval_enrol_utts"):
        assert fast[name].read_bytes() == slow[name].read_bytes(), name
