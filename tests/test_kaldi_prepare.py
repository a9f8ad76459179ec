"""The Kaldi-layout preparer: phrases from transcripts, models, trials, each kind of bad input."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from data_prep.corpus import FREE_TEXT_ID
from data_prep.kaldi_prepare import normalized, prepare_kaldi
from data_prep.layout import PHRASES
from data_prep.manifests import DataPrepError
from tests.conftest import KALDI_EN30, write_wav
from tests.helpers import ROOT, run_script_command

#: Two pass-phrases, each written three ways by the transcribers.
SPELLINGS = {
    "open": ["Open the door.", "open the door", "OPEN  the door!"],
    "voice": ["Verify my voice, please.", "verify my voice please", "Verify my voice please"],
}


def make_kaldi_miniature(root, trial_fields: int = 4):
    """A hand-made Kaldi-layout corpus: 4 speakers x 2 phrases x 4 reps, 2 models of 3.

    Every training transcript is one of its phrase's spellings; one free-text line. The trials
    have ``trial_fields`` fields (2: blind, 3: target|nontarget, 4: and the trial type).
    """
    tables = {name: [] for name in (
        "train/wav.scp", "train/utt2spk", "train/text", "enroll/wav.scp", "enroll/text",
        "enroll/models", "test/wav.scp", "trials",
    )}  # fmt: skip
    n = 0
    for spk in range(1, 5):
        for forms in SPELLINGS.values():
            for rep in range(4):
                n += 1
                utt = f"spk{spk}-u{n:03d}"
                write_wav(root / "audio" / "train" / f"{utt}.wav", seed=n)
                tables["train/wav.scp"].append(f"{utt} audio/train/{utt}.wav")
                tables["train/utt2spk"].append(f"{utt} spk{spk}")
                tables["train/text"].append(f"{utt} {forms[rep % 3]}")
    write_wav(root / "audio" / "train" / "spk1-free.wav", seed=99)
    tables["train/wav.scp"].append("spk1-free audio/train/spk1-free.wav")
    tables["train/utt2spk"].append("spk1-free spk1")
    tables["train/text"].append("spk1-free The weather is nice today.")
    for model, phrase in (("m1", "open"), ("m2", "voice")):
        ids = [f"{model}-e{i}" for i in range(3)]
        for i, utt in enumerate(ids):
            write_wav(root / "audio" / "enroll" / f"{utt}.wav", seed=200 + 10 * int(model[1]) + i)
            tables["enroll/wav.scp"].append(f"{utt} {root}/audio/enroll/{utt}.wav")  # absolute
            tables["enroll/text"].append(f"{utt} {SPELLINGS[phrase][i]}")
        tables["enroll/models"].append(f"{model} {' '.join(ids)}")
    for i in range(3):
        write_wav(root / "audio" / "test" / f"t{i}.wav", seed=300 + i)
        tables["test/wav.scp"].append(f"t{i} audio/test/t{i}.wav")
    keyed = [("m1", "t0", "target", "TC"), ("m1", "t1", "nontarget", "IC"),
             ("m2", "t2", "nontarget", "TW")]  # fmt: skip
    tables["trials"] = [" ".join(trial[:trial_fields]) for trial in keyed]
    for name, lines in tables.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _csv(folder, name):
    return pd.read_csv(folder / name, dtype=str, keep_default_na=False)


def _prepare(root, tmp_path, **options):
    options = {"valid_speakers": 1, "enrol_utts": 3, "phrase_min_count": 3, **options}
    return prepare_kaldi(root, tmp_path / "prep", **options)


def test_normalization_ignores_case_punctuation_and_spacing():
    assert {normalized(form) for form in SPELLINGS["open"]} == {"open the door"}
    assert normalized("  Verify   my voice, please.\t") == "verify my voice please"


def test_manifests_of_a_kaldi_corpus(tmp_path):
    root = make_kaldi_miniature(tmp_path / "corpus")
    _prepare(root, tmp_path, include_free_text=True)
    prep = tmp_path / "prep"
    train = _csv(prep, "train.csv")
    dev = pd.concat([_csv(prep, "valid_enrol_utts.csv"), _csv(prep, "valid_test.csv")])
    everything = pd.concat([train, dev])
    # Three spellings, one phrase each; numbered in the order of their normalized text.
    assert set(everything["phrase_id"]) == {"p01", "p02", FREE_TEXT_ID}
    assert set(everything.loc[everything.phrase_id == "p01", "phrase"]) == {"Open the door."}
    assert everything["wav"].str.startswith("$data_root/audio/train/").all()
    models = _csv(prep, "eval_enrol.csv")
    assert models.set_index("model_id")["phrase_id"].to_dict() == {"m1": "p01", "m2": "p02"}
    enrol = _csv(prep, "eval_enrol_utts.csv")
    assert enrol["wav"].str.startswith("$data_root/audio/enroll/").all()  # absolute, inside
    trials = _csv(prep, "eval_trials.csv")
    assert trials.values.tolist() == [
        ["m1", "t0", "1", "TC"], ["m1", "t1", "0", "IC"], ["m2", "t2", "0", "TW"],
    ]  # fmt: skip
    test = _csv(prep, "eval_test.csv")
    assert (test[["spk_id", "phrase_id", "phrase"]] == "").all(axis=None)  # blind: never read
    valid_models = _csv(prep, "valid_enrol.csv")
    assert len(valid_models) == 2 and (valid_models["enrol_ids"].str.split().map(len) == 3).all()


def test_rare_transcripts_are_free_text_and_left_out_unless_asked(tmp_path):
    root = make_kaldi_miniature(tmp_path / "corpus")
    _prepare(root, tmp_path)
    assert "spk1-free" not in set(_csv(tmp_path / "prep", "train.csv")["ID"])
    with pytest.raises(DataPrepError) as refused:  # no phrase is common enough
        _prepare(root, tmp_path, phrase_min_count=20)
    message = str(refused.value)
    assert "models:1: m1: its phrase 'open the door' is not a training phrase (seen 16" in message
    assert "unknown model" not in message  # its trials go with it, said once


def test_trials_with_target_labels_only_or_none(tmp_path):
    root = make_kaldi_miniature(tmp_path / "corpus", trial_fields=3)
    _prepare(root, tmp_path)
    assert list(_csv(tmp_path / "prep", "eval_trials.csv")["condition"]) == ["TC", "NT", "NT"]
    root = make_kaldi_miniature(tmp_path / "blind", trial_fields=2)
    prepare_kaldi(root, tmp_path / "blind_prep", valid_speakers=1, phrase_min_count=3)
    trials = _csv(tmp_path / "blind_prep", "eval_trials.csv")
    assert (trials[["label", "condition"]] == "").all(axis=None) and len(trials) == 3


def test_utt2phrase_gives_the_phrase_ids(tmp_path):
    root = make_kaldi_miniature(tmp_path / "corpus")
    for folder in ("train", "enroll"):
        lines = (root / folder / "text").read_text().splitlines()
        ids = [line.split()[0] for line in lines]
        phrase = ["A" if "door" in line.lower() else "B" for line in lines]
        (root / folder / "utt2phrase").write_text(
            "".join(f"{u} {p}\n" for u, p in zip(ids, phrase, strict=True))
        )
    _prepare(root, tmp_path)
    models = _csv(tmp_path / "prep", "eval_enrol.csv")
    assert set(models["phrase_id"]) == {"p01", "p02"}
    assert set(_csv(tmp_path / "prep", "train.csv")["phrase_id"]) == {"p01", "p02"}


def _no_path(root):
    """A ``wav.scp`` line with no path."""
    lines = (root / "train/wav.scp").read_text().splitlines()
    (root / "train/wav.scp").write_text("\n".join([lines[0].split()[0], *lines[1:]]) + "\n")
    return r"train/wav.scp:1: spk1-u001: expected an id and a path"


def _not_in_utt2spk(root):
    """An utterance missing from ``utt2spk``."""
    lines = (root / "train/utt2spk").read_text().splitlines()
    (root / "train/utt2spk").write_text("\n".join(lines[1:]) + "\n")
    return r"train/wav.scp:1: spk1-u001: utterance missing from .*train/utt2spk"


def _disagreeing_model(root):
    """A model whose enrollment transcripts say two phrases."""
    text = (root / "enroll/text").read_text().replace("m1-e2 open the door", "m1-e2 other words")
    (root / "enroll/text").write_text(text.replace("m1-e2 OPEN  the door!", "m1-e2 other words"))
    return r"enroll/models:1: m1: enrollment transcripts disagree \(m1-e0: 'open the door'"


def _unknown_model(root):
    """A trial naming a model that is not enrolled."""
    (root / "trials").write_text((root / "trials").read_text() + "m9 t0 target TC\n")
    return r"trials:4: m9 t0: unknown model id"


def _unknown_test(root):
    """A trial naming a test utterance that ``test/wav.scp`` lacks."""
    (root / "trials").write_text((root / "trials").read_text() + "m1 t7 nontarget IC\n")
    return r"trials:4: m1 t7: unknown test utterance \(not in test/wav.scp\)"


def _duplicate_id(root):
    """An utterance id listed twice (in two data directories)."""
    (root / "test/wav.scp").write_text(
        (root / "test/wav.scp").read_text() + "spk1-u001 audio/test/t0.wav\n"
    )
    return r"test/wav.scp:4: spk1-u001: duplicate utterance id \(also at .*train/wav.scp:1\)"


def _outside(root):
    """A relative path that leads out of the corpus folder."""
    outside = root.parent / "elsewhere.wav"
    write_wav(outside, seed=5)
    (root / "test/wav.scp").write_text(
        (root / "test/wav.scp").read_text().replace("audio/test/t2.wav", "../elsewhere.wav")
    )
    return r"test/wav.scp:3: ../elsewhere.wav: outside the corpus folder .* audio_outside_data_f"


def _cp1256_transcripts(root):
    """Transcripts saved in Windows Arabic/Persian (cp1256), one of them Persian."""
    lines = (root / "train/text").read_text().splitlines()
    lines[5] = lines[5].split()[0] + " در را باز کن"
    (root / "train/text").write_bytes(("\n".join(lines) + "\n").encode("cp1256"))
    return r"train/text:6: not UTF-8 \(byte 0x[0-9a-f]{2}\).* iconv -f CP1256 -t UTF-8"


def _latin1_trials(root):
    """A trials file in Latin-1 (an accented test id)."""
    text = (root / "trials").read_text() + "m1 t\u00e9 nontarget IC\n"
    (root / "trials").write_bytes(text.encode("latin-1"))
    return r"trials:4: not UTF-8 \(byte 0xe9\)"


def _segments(root):
    """Utterances cut from recordings (Kaldi's segments file)."""
    (root / "train/segments").write_text("spk1-u001 rec1 0.00 1.20\n")
    return r"train/segments: utterances cut from recordings \(Kaldi segments\) are not supported"


def _ark(root):
    """An archive entry in wav.scp (Kaldi's ark:offset)."""
    text = (root / "test/wav.scp").read_text().replace("audio/test/t1.wav", "data/raw.ark:1234")
    (root / "test/wav.scp").write_text(text)
    return r"test/wav.scp:2: data/raw.ark:1234: a Kaldi archive entry, not an audio file"


def _linked_outside(root):
    """A folder inside the corpus that is a symbolic link to one outside it."""
    outside = root.parent / "elsewhere"
    write_wav(outside / "t2.wav", seed=5)
    (root / "audio/linked").symlink_to(outside, target_is_directory=True)
    text = (root / "test/wav.scp").read_text().replace("audio/test/t2.wav", "audio/linked/t2.wav")
    (root / "test/wav.scp").write_text(text)
    return r"test/wav.scp:3: audio/linked/t2.wav: outside the corpus folder .* symbolic link"


def _unlabelled_first_trial(root):
    """One unlabelled trial at the top of a labelled list: it is the problem, not the others."""
    (root / "trials").write_text("m2 t0\n" + (root / "trials").read_text())
    return r"trials:1: m2 t0: expected 4 fields, as 3 of the 4 lines have"


@pytest.mark.parametrize(
    "breakage",
    [_no_path, _not_in_utt2spk, _disagreeing_model, _unknown_model, _unknown_test,
     _duplicate_id, _outside, _cp1256_transcripts, _latin1_trials, _segments, _ark,
     _linked_outside, _unlabelled_first_trial],
    ids=lambda f: f.__name__.strip("_"),
)  # fmt: skip
def test_bad_input_is_named_with_its_file_and_line_and_nothing_is_written(tmp_path, breakage):
    root = make_kaldi_miniature(tmp_path / "corpus")
    expected = breakage(root)
    with pytest.raises(DataPrepError, match=expected):
        _prepare(root, tmp_path)
    assert not (tmp_path / "prep" / "train.csv").exists()


def test_skip_bad_drops_the_minority_of_a_mixed_trials_list(tmp_path):
    root = make_kaldi_miniature(tmp_path / "corpus")
    _unlabelled_first_trial(root)
    _prepare(root, tmp_path, skip_bad=True)
    trials = _csv(tmp_path / "prep", "eval_trials.csv")
    assert list(trials["condition"]) == ["TC", "IC", "TW"]  # the labelled three kept


def test_persian_letters_typed_two_ways_are_one_phrase_and_near_twins_are_named(tmp_path, capsys):
    root = make_kaldi_miniature(tmp_path / "corpus")
    arabic_kaf, keheh = "در را باز كن", "در را باز کن"  # Arabic and Persian keyboards
    for folder in ("train", "enroll"):
        lines = (root / folder / "text").read_text().splitlines()
        for i, line in enumerate(lines):
            utt, text = line.split(" ", 1)
            if normalized(text) == "open the door":
                lines[i] = f"{utt} {arabic_kaf if i % 2 else keheh}"
        (root / folder / "text").write_text("\n".join(lines) + "\n")
    _prepare(root, tmp_path)
    train = _csv(tmp_path / "prep", "train.csv")
    assert set(train["phrase_id"]) == {"p01", "p02"}  # one phrase, however its kaf was typed
    models = _csv(tmp_path / "prep", "eval_enrol.csv")
    assert models.set_index("model_id")["phrase_id"].to_dict() == {"m1": "p02", "m2": "p01"}
    assert "differ by one character" not in capsys.readouterr().out
    text = (
        (root / "train/text")
        .read_text()
        .replace("verify my voice please", "verify my voices please")
    )
    (root / "train/text").write_text(text)
    _prepare(root, tmp_path / "twins", phrase_min_count=1)
    warned = capsys.readouterr().out
    assert "warning: phrases" in warned and "differ by one character" in warned
    assert "'verify my voice please'" in warned and "'verify my voices please'" in warned


def test_audio_outside_the_corpus_folder_when_allowed(tmp_path):
    root = make_kaldi_miniature(tmp_path / "corpus")
    _outside(root)
    _prepare(root, tmp_path, audio_outside_data_folder=True)
    test = _csv(tmp_path / "prep", "eval_test.csv").set_index("ID")["wav"]
    assert test["t2"] == (tmp_path / "elsewhere.wav").as_posix() and test["t0"].startswith("$")


def test_a_pipe_in_wav_scp_is_refused(tmp_path):
    root = make_kaldi_miniature(tmp_path / "corpus")
    scp = (
        (root / "test/wav.scp")
        .read_text()
        .replace("t0 audio/test/t0.wav", "t0 sox audio/test/t0.wav -t wav - |")
    )
    (root / "test/wav.scp").write_text(scp)
    expected = r"test/wav.scp:1: t0 sox .*: expected an id and a path, got 6 fields"
    with pytest.raises(DataPrepError, match=expected):
        _prepare(root, tmp_path)


def _fewer_training_repetitions(corpus: Path, folder: Path, reps: int) -> Path:
    """``corpus`` whose training speakers say each phrase only ``reps`` times (audio linked)."""
    folder.mkdir()
    (folder / "wav").symlink_to(corpus / "wav")
    for path in corpus.rglob("*"):
        if path.is_file() and "wav" not in path.relative_to(corpus).parts[:1]:
            (folder / path.relative_to(corpus)).parent.mkdir(parents=True, exist_ok=True)
            (folder / path.relative_to(corpus)).write_bytes(path.read_bytes())
    speaker = dict(line.split() for line in (corpus / "train/utt2spk").read_text().splitlines())
    text = dict(line.split(" ", 1) for line in (corpus / "train/text").read_text().splitlines())
    said, kept = Counter(), set()
    for utt in sorted(speaker):  # a phrase is its normalized transcript (three spellings here)
        said[speaker[utt], normalized(text[utt])] += 1
        if said[speaker[utt], normalized(text[utt])] <= reps:
            kept.add(utt)
    for name in ("wav.scp", "utt2spk", "text", "utt2lang"):
        lines = (corpus / "train" / name).read_text().splitlines()
        kept_lines = [line for line in lines if line.split(" ", 1)[0] in kept]
        (folder / "train" / name).write_text("\n".join(kept_lines) + "\n")
    return folder


@pytest.mark.slow
def test_the_recipe_trains_and_scores_a_kaldi_corpus_with_its_own_phrases(tmp_path, kaldi_corpus):
    """The demo YAML on a corpus sharing nothing with DeepMine, end to end (one epoch).

    Its training speakers say each phrase 4 times and its models have 5 utterances: the
    validation split's models have 3 (what 4 repetitions allow), never none.
    """
    corpus = _fewer_training_repetitions(kaldi_corpus, tmp_path / "corpus", reps=4)
    out = tmp_path / "exp"
    command = run_script_command(
        "train_speaker_embeddings.py", out, corpus, "--corpus", "kaldi",
        "--enrol_utts", str(KALDI_EN30["enrol_utts"]), "--number_of_epochs", "1",
        "--audio_outside_data_folder", "True",  # its wav/ links to the session's corpus
    )  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "models of 3 enrollment utterance(s) (the evaluation's models have 5, but the " in (
        result.stdout
    )
    valid = pd.read_csv(out / "prep" / "valid_enrol.csv", dtype=str)
    assert len(valid) > 0 and (valid["enrol_ids"].str.split().map(len) == 3).all()
    # The answer file: one LLR per trials line, in order.
    trials = (corpus / "trials").read_text().splitlines()
    answer = (out / "answer.txt").read_text().splitlines()
    assert len(answer) == len(trials) and all(float(v) == float(v) for v in answer)
    scored = [line.split()[:2] for line in (out / "scores_eval.txt").read_text().splitlines()]
    assert scored == [line.split()[:2] for line in trials]
    # That corpus's phrase classes, in the phrase branch and in the reports; no DeepMine row.
    phrases = [f"p{i:02d}" for i in range(1, 31)]
    classes = (out / "save" / "phrase_encoder.txt").read_text()
    assert all(f"'{p}'" in classes for p in phrases) and "'other'" in classes
    for split in ("valid", "eval"):
        report = json.loads((out / f"verification_{split}.json").read_text())
        assert set(report["by_phrase"]) == set(phrases), split
        assert set(report["by_language"]) == {"english"}, split
        assert not set(report["by_phrase"]) & set(PHRASES)
    models = pd.read_csv(out / "prep" / "eval_enrol.csv", dtype=str)
    assert (models["enrol_ids"].str.split().map(len) == KALDI_EN30["enrol_utts"]).all()
