"""The synthetic corpus: real layout, determinism, correct trial labels, sizes."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import soundfile as sf

from data_prep import synth_deepmine
from data_prep.layout import FREE_TEXT_ID, PHRASES
from data_prep.manifests import read_list
from data_prep.synth_deepmine import plan_corpus, synthesize_corpus
from tests.conftest import TINY


def _digest(root) -> str:
    """One hash over every file's path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_layout_matches_the_real_task1_folder(tiny_corpus):
    docs = tiny_corpus / "docs"
    assert (docs / "train_labels.txt").read_text().splitlines()[
        0
    ] == "train-file-id speaker-id phrase-id"
    train = read_list(docs / "train_labels.txt")
    per_speaker = len(PHRASES) * TINY["reps"] + TINY["free_text_train"]
    assert len(train) == TINY["speakers"] * per_speaker
    phrases = {line.fields[2] for line in train}
    assert phrases == set(PHRASES) | {FREE_TEXT_ID}  # free text is listed as such, like real data
    free_text = sum(line.fields[2] == FREE_TEXT_ID for line in train)
    assert free_text == TINY["speakers"] * TINY["free_text_train"]
    assert len({line.fields[1] for line in train}) == TINY["speakers"]
    models = read_list(docs / "model_enrollment.txt")
    assert len(models) == TINY["eval_speakers"] * len(PHRASES)
    assert all(len(m.fields) == 5 and m.fields[0].startswith("model_") for m in models)
    for subdir, prefix, count in (
        ("train", "trn_", len(train)),
        ("enrollment", "enr_", 3 * len(models)),
        (
            "evaluation",
            "evl_",
            TINY["eval_speakers"] * (len(PHRASES) * (TINY["reps"] - 3) + TINY["free_text"]),
        ),
    ):
        files = sorted((tiny_corpus / "wav" / subdir).glob("*.wav"))
        assert len(files) == count and all(f.name.startswith(prefix) for f in files)
    info = sf.info(str(files[0]))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    # Every id named in the lists exists as a file.
    for line in models:
        for enrol_id in line.fields[2:]:
            assert (tiny_corpus / "wav" / "enrollment" / f"{enrol_id}.wav").is_file()
    for line in read_list(docs / "trials.txt"):
        assert (tiny_corpus / "wav" / "evaluation" / f"{line.fields[1]}.wav").is_file()


def test_audio_is_speech_like_not_silence(tiny_corpus):
    wav, rate = sf.read(str(next((tiny_corpus / "wav" / "train").glob("*.wav"))))
    assert 1.0 < len(wav) / rate < 10.0
    frame_energy = np.square(wav[: len(wav) // 400 * 400].reshape(-1, 400)).mean(axis=1)
    # Speech has loud and quiet stretches (leading silence + noise vs voiced frames).
    assert frame_energy.max() > 10 * np.median(frame_energy)


def test_same_seed_same_bytes_whatever_the_jobs(tmp_path):
    small = dict(speakers=2, eval_speakers=1, reps=4, seed=3)
    one = synthesize_corpus(tmp_path / "a", jobs=1, **small)
    two = synthesize_corpus(tmp_path / "b", jobs=2, **small)
    assert _digest(one) == _digest(two)
    other = synthesize_corpus(tmp_path / "c", jobs=2, **{**small, "seed": 4})
    assert _digest(other) != _digest(one)


def test_regenerates_when_options_change(tmp_path):
    small = dict(speakers=2, eval_speakers=1, reps=4, seed=3)
    synthesize_corpus(tmp_path / "c", jobs=2, **small)
    synthesize_corpus(tmp_path / "c", jobs=2, **{**small, "reps": 5})
    assert len(list((tmp_path / "c" / "wav" / "train").glob("*.wav"))) == 2 * 10 * 5


def test_trial_key_agrees_with_who_said_what():
    plan = plan_corpus(1234, 40, 20, 6, {"TW": 3, "IC": 6, "IW": 3})
    truth = {u.file_id: (u.speaker, u.phrase_id) for u in plan.enrollment + plan.evaluation}
    model_truth = {m: truth[ids[0]] for m, _, ids in plan.models}
    for model_id, phrase_id, ids in plan.models:
        assert len(ids) == 3 and {truth[i] for i in ids} == {model_truth[model_id]}
        assert model_truth[model_id][1] == phrase_id
    for model_id, test_id, condition in plan.trials:
        (spk_m, phr_m), (spk_t, phr_t) = model_truth[model_id], truth[test_id]
        assert condition == ("T" if spk_m == spk_t else "I") + ("C" if phr_m == phr_t else "W")
    counts = Counter(c for _, _, c in plan.trials)
    assert min(counts[c] for c in ("TC", "TW", "IC", "IW")) >= 500, counts
    # Train and eval speakers are distinct identities; file ids do not follow speakers.
    assert {u.speaker for u in plan.train}.isdisjoint({u.speaker for u in plan.evaluation})
    first_ids = sorted(plan.train, key=lambda u: u.file_id)[:10]
    assert len({u.speaker for u in first_ids}) > 1


def test_written_key_matches_trials(tiny_corpus):
    trials = [line.fields for line in read_list(tiny_corpus / "docs" / "trials.txt")]
    key = [line.fields for line in read_list(tiny_corpus / "docs" / "trials_key.txt")]
    assert [k[:2] for k in key] == trials
    assert all((k[2] == "target") == (k[3] == "TC") for k in key)


def test_a_corpus_of_other_texts_is_not_reused(tiny_corpus, monkeypatch):
    marker = json.loads((tiny_corpus / "synth_options.json").read_text())
    assert marker["texts"] == synth_deepmine.texts_digest()
    monkeypatch.setitem(synth_deepmine.TRAIN_FREE_TEXT, "T01", ("english", "Another sentence."))
    assert synth_deepmine.texts_digest() != marker["texts"]  # so the options differ: resynthesis
