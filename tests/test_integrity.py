"""Nothing wrong is scored silently: the embedding cache, audio checks in scoring and the CLI."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.preprocess import AudioNormalizer

from data_prep.audio_checks import (
    MIN_SECONDS,
    AudioError,
    check_waveform,
    declared_wav_frames,
    waveform_problem,
)
from recipes.evaluation.scoring import EmbeddingTable
from recipes.evaluation.verification import cached_embeddings, embedding_cache
from recipes.experiment import checkpoint_state
from recipes.model.speaker_model import TDSVSpeakerRecognition
from recipes.model.trial_decisions import AudioRefused, audio_refusal
from recipes.training.checkpointing import CheckpointLoadError
from recipes.verify_speakers import PairsFileError, decision_note, read_pairs
from tests.conftest import write_wav
from tests.helpers import ROOT, two_at_a_time

SETTINGS = {"max_eval_seconds": 8.0, "eval_precision": "fp32", "sample_rate": 16000}


class CountingEmbedder:
    """An "embedding" that is the file's first samples; counts the utterances it embeds."""

    def __init__(self):
        self.embedded = []

    def __call__(self, dataset):
        """The tables of ``dataset``'s utterances."""
        vectors = {}
        for uid in dataset.data_ids:
            samples, _ = sf.read(dataset.data[uid]["wav"], frames=4)
            vectors[uid] = samples.astype(np.float32)
            self.embedded.append(uid)
        return {"speaker": EmbeddingTable.from_dict(vectors)}


def _dataset(folder, n=4):
    data = {f"u{i}": {"wav": str(folder / f"u{i}.wav"), "duration": 0.5} for i in range(n)}
    for i in range(n):
        if not (folder / f"u{i}.wav").exists():
            write_wav(folder / f"u{i}.wav", seed=i)
    return DynamicItemDataset(data).filtered_sorted(sort_key="duration", reverse=True)


def test_cache_reembeds_exactly_the_changed_audio(tmp_path, caplog):
    cache, embed = embedding_cache(tmp_path / "cache", SETTINGS), CountingEmbedder()
    dataset = _dataset(tmp_path / "corpus")
    cached_embeddings(embed, dataset, cache / "eval")
    assert sorted(embed.embedded) == ["u0", "u1", "u2", "u3"]
    embed.embedded.clear()
    cached_embeddings(embed, dataset, cache / "eval")
    assert embed.embedded == []
    # The same ids, one file rewritten: only it is embedded again, and the log says so.
    write_wav(tmp_path / "corpus" / "u2.wav", seed=99)
    with caplog.at_level("INFO"):
        tables = cached_embeddings(embed, dataset, cache / "eval")
    assert embed.embedded == ["u2"] and "1 of 4 utterance(s) changed" in caplog.text
    first, _ = sf.read(tmp_path / "corpus" / "u2.wav", frames=4)
    row = tables["speaker"].rows(["u2"], "test")[0]
    assert np.allclose(tables["speaker"].matrix[row], first)


def test_cache_is_not_reused_for_another_corpus_or_other_settings(tmp_path):
    cache, embed = embedding_cache(tmp_path / "cache", SETTINGS), CountingEmbedder()
    cached_embeddings(embed, _dataset(tmp_path / "corpus"), cache / "eval")
    embed.embedded.clear()
    # `--data_folder OTHER` with the same ids: every utterance is other audio.
    cached_embeddings(embed, _dataset(tmp_path / "other"), cache / "eval")
    assert len(embed.embedded) == 4
    embed.embedded.clear()
    cache = embedding_cache(tmp_path / "cache", {**SETTINGS, "max_eval_seconds": 4.0})
    cached_embeddings(embed, _dataset(tmp_path / "other"), cache / "eval")
    assert len(embed.embedded) == 4


@pytest.mark.parametrize("damage", ["npy", "ids", "sources"])
def test_a_damaged_cache_is_embedded_again_never_used(tmp_path, caplog, damage):
    cache, embed = embedding_cache(tmp_path / "cache", SETTINGS), CountingEmbedder()
    dataset = _dataset(tmp_path / "corpus")
    cached_embeddings(embed, dataset, cache / "eval")
    files = {"npy": "eval.npy", "ids": "eval.ids.txt", "sources": "eval.sources.json"}
    path = cache / files[damage]
    if damage == "ids":  # a line removed
        path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")
    else:  # truncated
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    embed.embedded.clear()
    with caplog.at_level("WARNING"):
        tables = cached_embeddings(embed, dataset, cache / "eval")
    assert sorted(embed.embedded) == ["u0", "u1", "u2", "u3"]
    assert f"embedding cache {cache / 'eval'} is damaged" in caplog.text
    assert sorted(tables["speaker"].ids) == ["u0", "u1", "u2", "u3"]
    embed.embedded.clear()
    cached_embeddings(embed, dataset, cache / "eval")  # rewritten whole
    assert embed.embedded == []


def test_declared_frames_catch_a_truncated_copy(tmp_path):
    path = tmp_path / "a.wav"
    write_wav(path, seconds=3.0)
    assert declared_wav_frames(path) == 48000
    path.write_bytes(path.read_bytes()[: 44 + 32000])
    assert declared_wav_frames(path) == 48000 and sf.info(str(path)).frames == 16000
    (tmp_path / "b.flac").write_bytes(b"fLaC")
    assert declared_wav_frames(tmp_path / "b.flac") is None


@pytest.mark.parametrize(
    "samples, reason",
    [
        (np.zeros(16000), "no speech energy"),
        (np.full(16000, 0.3), "no speech energy"),  # a constant offset carries no signal
        (np.r_[np.full(100, np.nan), np.ones(16000)], "100 non-finite sample(s)"),
        (np.ones(160), "too short (0.010 s, minimum 0.3 s)"),
    ],
)
def test_waveform_checks_name_the_file(samples, reason):
    with pytest.raises(AudioError, match=rf"^x\.wav: .*{re.escape(reason)}"):
        check_waveform(samples, 16000, "x.wav")


def test_quiet_speech_is_not_silence():
    rng = np.random.default_rng(0)
    quiet = 0.003 * rng.standard_normal(16000)  # about -50 dBFS
    assert check_waveform(quiet, 16000, "x.wav") is quiet


# ------------------------------------------------------------------------------------------------
# The inference class and the CLI
# ------------------------------------------------------------------------------------------------
WAVEFORMS = {
    "silence": np.zeros(16000),
    "offset": np.full(16000, 0.3),
    "nan": np.r_[np.full(100, np.nan), np.ones(16000)],
    "short": 0.1 * np.ones(160),
    "speech-like": 0.1 * np.sin(np.arange(16000) / 5.0),
}


@pytest.mark.parametrize("name", WAVEFORMS)
def test_the_exported_refusal_twin_agrees_with_data_prep(name):
    samples = WAVEFORMS[name].astype(np.float32)
    refusal = audio_refusal(torch.from_numpy(samples), 16000, MIN_SECONDS)
    level = r"-?\d+ dBFS,"  # -200 (float64) or -150 (float32 rounding): silence either way
    assert re.sub(level, "", str(refusal)) == re.sub(
        level, "", str(waveform_problem(samples, 16000))
    )


def _verifier(**hparams):
    return TDSVSpeakerRecognition(
        modules={"embedding_model": torch.nn.Identity()},
        hparams={"audio_normalizer": AudioNormalizer(16000), **hparams},
    )


def test_the_loader_caps_long_files_and_refuses_silence(tmp_path, caplog):
    verifier = _verifier(max_eval_seconds=2.0, min_audio_seconds=0.3)
    write_wav(tmp_path / "long.wav", seconds=5.0)
    with caplog.at_level("WARNING"):
        wav = verifier.load_audio(tmp_path / "long.wav")
    assert wav.shape == (32000,) and "cut from 5.0 s to 2.0 s (max_eval_seconds)" in caplog.text
    sf.write(tmp_path / "silent.wav", np.zeros(16000), 16000)
    with pytest.raises(AudioRefused, match=r"silent\.wav: no speech energy"):
        verifier.verify_trial([tmp_path / "long.wav"], tmp_path / "silent.wav")


def test_decisions_say_which_enrollment_count_was_calibrated():
    verifier = _verifier(
        operating_point="eer", thresholds={"eer": {"1": 0.5, "3": 0.7}}, fusion=None
    )
    args = argparse.Namespace(threshold=None)
    assert "3-utterance enrollment, the nearest calibrated count to 5" in decision_note(
        verifier, 5, args
    )
    assert decision_note(verifier, 3, args).endswith(
        "(validation eer point, 3-utterance enrollment)"
    )


def test_pairs_files_take_a_byte_order_mark_and_quoted_paths(tmp_path):
    (tmp_path / "my enrol.wav").touch()
    (tmp_path / "test.wav").touch()
    pairs = tmp_path / "pairs.txt"
    pairs.write_text('\ufeff1 "my enrol.wav" test.wav  # a comment\n', encoding="utf-8")
    (pair,) = read_pairs(pairs, tmp_path)
    assert pair.label is True and pair.enrol == [tmp_path / "my enrol.wav"]
    pairs.write_text('1 "my enrol.wav test.wav\n')
    with pytest.raises(PairsFileError, match=r"pairs\.txt:1: No closing quotation"):
        read_pairs(pairs, tmp_path)


def _cli(*args):
    command = [sys.executable, str(ROOT / "recipes" / "verify_speakers.py"), "files"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_cli_checks_arguments_and_audio_before_loading_a_model(tmp_path):
    good, silent = tmp_path / "good.wav", tmp_path / "silent.wav"
    write_wav(good, seconds=1.0)
    sf.write(silent, np.zeros(16000), 16000)
    (tmp_path / "pairs.txt").write_text(f"{good} {good}\n")
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:20000])
    copy = tmp_path / "copy.wav"  # the same recording under another name
    copy.write_bytes(good.read_bytes())
    (tmp_path / "bad_pairs.txt").write_text("only-one-field\n" * 30)  # 30 problems, 20 shown
    not_a_model = tmp_path  # each check below must come before the model folder is read
    cases = {
        ("--pairs", tmp_path / "pairs.txt", "--test", good): "--test goes with --enrol",
        ("--enrol", good, "--test", good, "--threshold", "nan"): "--threshold must be a finite",
        ("--enrol", good, "--test", good, "--c_miss", "inf"): "--c_fa finite and positive",
        ("--enrol", good, good, "--test", silent): f"repeats a recording: {good} is {good}",
        ("--enrol", good, copy, "--test", silent): f"repeats a recording: {copy} is {good}",
        ("--pairs", tmp_path / "bad_pairs.txt"): "... and 10 more problem(s)",
        ("--enrol", good, "--test", good, "--c_fa", "nan"): "--c_fa finite and positive",
        ("--enrol", good, "--test", good, "--out", tmp_path / "no/such/dir.txt"): "--out",
        ("--enrol", good, "--test", silent): f"{silent}: no speech energy",
        ("--enrol", truncated, "--test", good): f"{truncated}: truncated: the header declares",
    }
    results = two_at_a_time(lambda args: _cli("--model", not_a_model, *args), cases)
    for (args, message), result in zip(cases.items(), results, strict=True):
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
        assert "not a model folder" not in result.stderr


def test_a_damaged_checkpoint_file_is_named(tmp_path):
    folder = tmp_path / "CKPT+2026-01-01+00-00-00+00"
    folder.mkdir()
    torch.save({"w": torch.ones(1000)}, folder / "wavlm.ckpt")
    (folder / "wavlm.ckpt").write_bytes((folder / "wavlm.ckpt").read_bytes()[:2000])
    checkpoint = argparse.Namespace(path=folder)
    with pytest.raises(
        CheckpointLoadError, match=r"CKPT\+2026.*damaged \(truncated\?\) file\(s\): wavlm\.ckpt"
    ):
        checkpoint_state(checkpoint, "wavlm")
