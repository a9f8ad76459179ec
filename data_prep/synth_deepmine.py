"""Write a synthetic corpus in exactly the DeepMine "task1" layout, as SdSV or TdSV 2024 ship it.

The ten DeepMine pass-phrases are spoken by seeded synthetic speakers with libespeak-ng (shipped by
the ``espeakng-loader`` wheel, called through ``ctypes``: no root, no apt, no network), then
coloured, noised and reverberated so that speaker verification on it is not trivial.

A *speaker* is a fixed identity: espeak-ng voice variant (two speakers may share one), base pitch,
pitch range, speaking rate, a vocal-tract scale (resampling shifts all formants) and a channel EQ.
An *utterance* varies around its speaker: pitch/rate jitter, leading/trailing silence, additive
white/pink/babble noise at a random SNR, optional reverberation and a random gain.

The official lists come in either release's form (``--layout``, ``data_prep/layout.py``):

- ``sdsv`` (SdSV 2020-21): ``docs/model_enrollment.txt`` (five columns) and ``docs/trials.txt``,
  with the key the real release keeps secret in ``docs/trials_key.txt``;
- ``tdsv2024`` (TdSV 2024): the evaluation speakers' models split into a dev pair
  (``docs/dev_model_enrollment.txt``, ``docs/dev_trials.txt``: the first third of the speakers)
  and an eval pair (``docs/eval_*``), six-column enrollment lines with each speaker's gender,
  model ids ``dev_model_000001`` / ``eval_model_000001``, and the keys outside ``docs/``, as the
  challenge ships none: ``keys/dev_trials_key.txt``, ``keys/eval_trials_key.txt``. A model
  keeps the trials it has in the other form (their test files may be the other split's).

Both forms hold the same audio: asked for the other form of a corpus already written, only the
lists are rewritten.

Usage::

    python data_prep/synth_deepmine.py --out data/synth_deepmine --speakers 40 --eval_speakers 20
    python data_prep/synth_deepmine.py --out data/synth_tdsv2024 --layout tdsv2024

The output is byte-identical for a given seed and size, whatever ``--jobs`` is.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import multiprocessing
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.corpus import SAMPLE_RATE, condition_of
from data_prep.layout import (
    FREE_TEXT_ID,
    PHRASES,
    RELEASES,
    list_names,
    phrase_language,
    wav_path,
)

ESPEAK_RATE, ESPEAK_PITCH, ESPEAK_RANGE = 1, 3, 4  # espeak_PARAMETER enum values
ESPEAK_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS
ESPEAK_POS_CHARACTER, ESPEAK_CHARS_UTF8 = 1, 1

# Variants of espeak-ng's "!v" folder that sound like a human talker (robots and effects left out).
VOICE_VARIANTS = (
    "m1 m2 m3 m4 m5 m6 m7 m8 f1 f2 f3 f4 f5 klatt klatt2 klatt3 klatt4 klatt6 adam andy "
    "annie anika antonio aunty belinda benjamin boris caleb david ed edward edward2 gene "
    "grandma grandpa gustave ian iven iven2 iven3 iven4 john linda max michel miguel mike2 "
    "norbert pablo paul pedro quincy rob robert sandro shelby steph steph2 steph3 travis victor zac"
).split()
LANGUAGE_VOICE = {"persian": "fa", "english": "en"}
#: The variants of ``VOICE_VARIANTS`` with a female voice: a speaker's gender in TdSV 2024's lists.
FEMALE_VARIANTS = frozenset(
    "f1 f2 f3 f4 f5 annie anika aunty belinda grandma linda shelby steph steph2 steph3".split()
)

#: The release forms of the official lists (``--layout``) -> the release (``layout.RELEASES``).
LAYOUTS = {"sdsv": "SdSV 2020-21", "tdsv2024": "TdSV 2024"}

#: Free-text sentences (not pass-phrases) that evaluation speakers say for wrong-phrase (TW)
#: trials, as in TdSV 2024's evaluation data: the phrase check meets sentences it never saw.
FREE_TEXT = {
    "F01": ("english", "The train leaves at half past seven."),
    "F02": ("english", "Please call me back tomorrow morning."),
    "F03": ("english", "She opened the window to let in some air."),
    "F04": ("english", "I would like a cup of tea with milk."),
    "F05": ("english", "The library closes early on Fridays."),
    "F06": ("persian", "امروز هوا خیلی خوب است."),
    "F07": ("persian", "من هر روز به کتابخانه می روم."),
    "F08": ("persian", "فردا صبح به خانه برمی گردم."),
    "F09": ("persian", "لطفا در را پشت سرت ببند."),
    "F10": ("persian", "این کتاب را خیلی دوست دارم."),
}
#: Free text of the training speakers: other sentences than the evaluation's, so the "other"
#: phrase class (``include_free_text``) is trained without ever seeing the test sentences.
TRAIN_FREE_TEXT = {
    "T01": ("english", "We walked along the river after dinner."),
    "T02": ("english", "My brother plays the guitar every evening."),
    "T03": ("english", "The meeting was moved to next Tuesday."),
    "T04": ("english", "It rained all night in the mountains."),
    "T05": ("english", "Could you pass me the salt, please?"),
    "T06": ("persian", "دیروز با دوستانم به پارک رفتیم."),
    "T07": ("persian", "قطار ساعت هشت صبح حرکت می کند."),
    "T08": ("persian", "خواهرم در دانشگاه درس می خواند."),
    "T09": ("persian", "شب ها هوا کمی سرد می شود."),
    "T10": ("persian", "لطفا چراغ اتاق را خاموش کن."),
}


def texts_digest() -> str:
    """A digest of every sentence the corpus can say: a corpus made from other texts is stale."""
    texts = json.dumps([PHRASES, FREE_TEXT, TRAIN_FREE_TEXT], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(texts.encode()).hexdigest()[:16]


#: ``(language, text)`` of every pass-phrase id and free-text sentence id of the corpus.
DEEPMINE_TEXTS = {
    **{phrase_id: (phrase_language(phrase_id), text) for phrase_id, text in PHRASES.items()},
    **FREE_TEXT,
    **TRAIN_FREE_TEXT,
}


def utterance_text(phrase_id: str, texts: dict | None = None) -> tuple[str, str]:
    """``(language, text)`` of a phrase or free-text sentence id (of ``texts``: DeepMine's)."""
    return (texts or DEEPMINE_TEXTS)[phrase_id]


@dataclass(frozen=True)
class Speaker:
    """A seeded synthetic identity."""

    variant: str
    pitch: int  # espeak-ng base pitch, 0-100
    pitch_range: int  # espeak-ng pitch range, 0-100
    rate: int  # words per minute
    tract_scale: float  # >1 shortens the vocal tract (formants up), <1 lengthens it
    eq: tuple[tuple[float, float, float], ...]  # (centre Hz, gain dB, Q) peaking filters


@dataclass(frozen=True)
class Utterance:
    """One file to write: where it goes, who says what, and the seed of its variation."""

    file_id: str
    subdir: str  # train | enrollment | evaluation
    speaker: int
    phrase_id: str
    seed: tuple[int, ...]


def draw_speakers(seed: int, count: int) -> list[Speaker]:
    """The corpus's ``count`` speaker identities, drawn from the seed."""
    rng = np.random.default_rng([seed, 4])
    return [draw_speaker(rng) for _ in range(count)]


def gender(speaker: Speaker) -> str:
    """``f`` or ``m``: the voice variant's."""
    return "f" if speaker.variant in FEMALE_VARIANTS else "m"


def draw_speaker(rng: np.random.Generator) -> Speaker:
    """Draw one speaker identity."""
    eq = tuple(
        (float(rng.uniform(250, 5000)), float(rng.uniform(-8, 8)), float(rng.uniform(0.7, 2.5)))
        for _ in range(2)
    )
    return Speaker(
        variant=str(rng.choice(VOICE_VARIANTS)),
        pitch=int(rng.integers(15, 86)),
        pitch_range=int(rng.integers(20, 91)),
        rate=int(rng.integers(120, 221)),
        tract_scale=float(rng.uniform(0.85, 1.15)),
        eq=eq,
    )


# --------------------------------------------------------------------------------------------
# espeak-ng through ctypes. espeak-ng keeps synthesis state (and a random generator) across calls,
# so two syntheses of the same text in one process differ, and it seeds that generator at start-up
# from the clock; from a fresh start with a fixed seed, the same sequence of calls gives the same
# bytes. We initialize it once in the parent (which never synthesizes) and
# synthesize fixed chunks of utterances, each in a freshly forked child: the output is the same
# bytes whatever the number of jobs.
# --------------------------------------------------------------------------------------------
_ESPEAK = {}


def _init_espeak() -> None:
    """Load and initialize libespeak-ng in this (parent) process; children inherit it by fork."""
    if _ESPEAK:
        return
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    data = espeakng_loader.get_data_path().encode()
    sample_rate = lib.espeak_Initialize(ESPEAK_SYNCHRONOUS, 0, data, 0)
    if sample_rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({sample_rate}) with data at {data!r}")
    chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
    )

    def on_samples(wav, count, _events):
        """espeak-ng's synthesis callback: keep a copy of each chunk of samples; 0 to go on."""
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    callback = callback_type(on_samples)
    lib.espeak_SetSynthCallback(callback)
    _ESPEAK.update(lib=lib, rate=sample_rate, chunks=chunks, callback=callback)


def _reseed_espeak(seed: int) -> None:
    """Fix espeak-ng's internal random generator (breath and aspiration noise)."""
    _ESPEAK["lib"].espeak_ng_SetRandSeed(ctypes.c_long(seed))


def espeak(
    text: str, voice: str, rate: int, pitch: int, pitch_range: int
) -> tuple[np.ndarray, int]:
    """Synthesize ``text``; returns float32 samples in [-1, 1] and espeak-ng's sample rate."""
    lib, chunks = _ESPEAK["lib"], _ESPEAK["chunks"]
    chunks.clear()
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise RuntimeError(f"espeak-ng has no voice {voice!r}")
    for parameter, value in (
        (ESPEAK_RATE, rate),
        (ESPEAK_PITCH, pitch),
        (ESPEAK_RANGE, pitch_range),
    ):
        lib.espeak_SetParameter(parameter, int(value), 0)
    data = text.encode("utf-8")
    lib.espeak_Synth(data, len(data) + 1, 0, ESPEAK_POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return samples.astype(np.float32) / 32768.0, _ESPEAK["rate"]


# --------------------------------------------------------------------------------------------
# Signal processing of one utterance.
# --------------------------------------------------------------------------------------------
def resample(wav: np.ndarray, source_rate: float) -> np.ndarray:
    """Resample to 16 kHz. A non-integer ``source_rate`` is how the vocal-tract scale is applied."""
    length = round(len(wav) * SAMPLE_RATE / source_rate)
    return signal.resample(wav, length).astype(np.float32)


def apply_eq(wav: np.ndarray, eq) -> np.ndarray:
    """Channel colouring: a cascade of peaking biquads (RBJ cookbook)."""
    for centre, gain_db, q in eq:
        amp, w0 = 10 ** (gain_db / 40), 2 * np.pi * centre / SAMPLE_RATE
        alpha = np.sin(w0) / (2 * q)
        b = [1 + alpha * amp, -2 * np.cos(w0), 1 - alpha * amp]
        a = [1 + alpha / amp, -2 * np.cos(w0), 1 - alpha / amp]
        wav = signal.lfilter(b, a, wav)
    return wav.astype(np.float32)


def pink_noise(rng: np.random.Generator, length: int) -> np.ndarray:
    """1/f noise by spectral shaping of white noise."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    return np.fft.irfft(spectrum, length)


def make_noise(rng: np.random.Generator, length: int, babble: np.ndarray) -> np.ndarray:
    """White, pink or babble noise (a random stretch of the babble bank), unit power."""
    kind = rng.choice(["white", "pink", "babble"])
    if kind == "white":
        noise = rng.standard_normal(length)
    elif kind == "pink":
        noise = pink_noise(rng, length)
    else:
        start = int(rng.integers(0, len(babble) - length)) if len(babble) > length else 0
        noise = np.resize(babble[start:], length)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-9)


def reverberate(rng: np.random.Generator, wav: np.ndarray) -> np.ndarray:
    """Convolve with an exponentially decaying noise impulse response (RT60 0.15-0.6 s)."""
    rt60 = rng.uniform(0.15, 0.6)
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60) * 0.3
    rir[0] = 1.0
    return signal.fftconvolve(wav, rir)[: len(wav)]


def render(utt: Utterance, speaker: Speaker, babble: np.ndarray, texts=None) -> np.ndarray:
    """The 16 kHz float waveform of one utterance (its text from ``texts``: DeepMine's)."""
    rng = np.random.default_rng(utt.seed)
    language, text = utterance_text(utt.phrase_id, texts)
    voice = f"{LANGUAGE_VOICE[language]}+{speaker.variant}"
    speech, rate = espeak(
        text,
        voice,
        rate=int(speaker.rate * rng.uniform(0.92, 1.08)),
        pitch=int(np.clip(speaker.pitch + rng.integers(-4, 5), 0, 100)),
        pitch_range=int(np.clip(speaker.pitch_range + rng.integers(-8, 9), 0, 100)),
    )
    speech = apply_eq(resample(speech, rate * speaker.tract_scale), speaker.eq)
    speech_power = np.mean(speech**2) + 1e-12
    lead, tail = (int(rng.uniform(0.1, 0.6) * SAMPLE_RATE) for _ in range(2))
    wav = np.concatenate([np.zeros(lead), speech, np.zeros(tail)])
    if rng.random() < 0.3:
        wav = reverberate(rng, wav)
    snr_db = rng.uniform(5, 30)
    wav = wav + make_noise(rng, len(wav), babble) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    peak = 10 ** (-rng.uniform(1, 12) / 20)
    return (wav * peak / (np.max(np.abs(wav)) + 1e-9)).astype(np.float32)


def babble_bank(seed: int, talkers: int = 6, phrases=None) -> np.ndarray:
    """Several talkers (not corpus speakers) saying all phrases, overlapped: the babble noise.

    ``phrases``: ``(language, text)`` pairs (default: DeepMine's, in phrase id order).
    """
    phrases = phrases or [DEEPMINE_TEXTS[phrase_id] for phrase_id in sorted(PHRASES)]
    rng = np.random.default_rng([seed, 99])
    _reseed_espeak(seed)
    tracks = []
    for _ in range(talkers):
        speaker = draw_speaker(rng)
        parts = []
        for index in rng.permutation(len(phrases)):
            language, text = phrases[index]
            voice = f"{LANGUAGE_VOICE[language]}+{speaker.variant}"
            speech, rate = espeak(text, voice, speaker.rate, speaker.pitch, speaker.pitch_range)
            parts.append(resample(speech, rate * speaker.tract_scale))
        tracks.append(np.concatenate(parts))
    length = min(len(t) for t in tracks)
    return np.sum([t[:length] for t in tracks], axis=0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Work in forked children (see the espeak note above).
# --------------------------------------------------------------------------------------------
_SHARED = {}


CHUNK = 32  # utterances per forked child; part of what fixes the output bytes, not a tuning knob


def _write_chunk(chunk: list[Utterance]) -> float:
    """Render and write a chunk of utterances in a fresh child; returns their total duration."""
    total = 0.0
    _reseed_espeak(int(np.random.default_rng(chunk[0].seed).integers(2**31)))
    for utt in chunk:
        wav = render(utt, _SHARED["speakers"][utt.speaker], _SHARED["babble"], _SHARED["texts"])
        sf.write(_SHARED["path_of"](utt), wav, SAMPLE_RATE, subtype="PCM_16")
        total += len(wav) / SAMPLE_RATE
    return total


def _fork_map(function, items, jobs: int) -> list:
    """Map in children forked from this process, one fresh child per item, in order."""
    context = multiprocessing.get_context("fork")
    with context.Pool(jobs, maxtasksperchild=1) as pool:
        return pool.map(function, items, chunksize=1)


# --------------------------------------------------------------------------------------------
# Corpus plan: who says what, file ids, enrollment models and trials.
# --------------------------------------------------------------------------------------------
@dataclass
class CorpusPlan:
    """Everything about the corpus except the audio."""

    train: list[Utterance]
    enrollment: list[Utterance]
    evaluation: list[Utterance]
    models: list[tuple[str, str, list[str]]]  # (model id, phrase id, enrollment file ids)
    trials: list[tuple[str, str, str]]  # (model id, evaluation file id, condition)
    train_speaker_ids: list[str]


def _numbered(prefix: str, count: int, rng: np.random.Generator, width: int = 6) -> list[str]:
    """``count`` ids in a random order, so that file ids reveal neither speaker nor phrase."""
    return [f"{prefix}_{i + 1:0{width}d}" for i in rng.permutation(count)]


def plan_corpus(
    seed: int,
    speakers: int,
    eval_speakers: int,
    reps: int,
    trials_per_model: dict[str, int],
    free_text: int = 0,
    free_text_trials: int = 0,
    free_text_train: int = 0,
    phrases: list[str] | None = None,
    enrol_utts: int = 3,
    languages: tuple[str, ...] | None = None,
) -> CorpusPlan:
    """Decide every file, model and trial of the corpus from the seed.

    ``free_text`` sentences of ``FREE_TEXT`` per evaluation speaker are added as test utterances,
    and ``free_text_trials`` of them per model as extra TW trials (same speaker, not a
    pass-phrase); ``free_text_train`` sentences of ``TRAIN_FREE_TEXT`` per training speaker are
    added to the training list. They are drawn from separate random streams, so the rest of the
    corpus is the same with or without them. ``phrases`` (default DeepMine's ids) are the
    pass-phrases, each model has ``enrol_utts`` utterances, and free text is drawn from the
    sentences in ``languages`` only (default: all).
    """
    if reps <= enrol_utts:
        raise ValueError(
            f"--reps must be at least {enrol_utts + 1} ({enrol_utts} enrollment + at least 1 "
            "test utterance)"
        )
    rng = np.random.default_rng([seed, 0])
    phrases = sorted(phrases or PHRASES)
    # Training speakers: all phrases, reps times.
    train_pairs = [(s, p) for s in range(speakers) for p in phrases for _ in range(reps)]
    train_ids = _numbered("trn", len(train_pairs), rng)
    train = [
        Utterance(fid, "train", s, p, (seed, 1, i))
        for i, (fid, (s, p)) in enumerate(zip(train_ids, train_pairs, strict=True))
    ]
    # Evaluation speakers (distinct identities): enrollment + test utterances of each phrase.
    eval_spk = list(range(speakers, speakers + eval_speakers))
    enrol_pairs = [(s, p) for s in eval_spk for p in phrases for _ in range(enrol_utts)]
    test_pairs = [(s, p) for s in eval_spk for p in phrases for _ in range(reps - enrol_utts)]
    enrol_ids = _numbered("enr", len(enrol_pairs), rng)
    test_ids = _numbered("evl", len(test_pairs), rng)
    enrollment = [
        Utterance(fid, "enrollment", s, p, (seed, 2, i))
        for i, (fid, (s, p)) in enumerate(zip(enrol_ids, enrol_pairs, strict=True))
    ]
    evaluation = [
        Utterance(fid, "evaluation", s, p, (seed, 3, i))
        for i, (fid, (s, p)) in enumerate(zip(test_ids, test_pairs, strict=True))
    ]
    model_keys = [(s, p) for s in eval_spk for p in phrases]
    model_ids = [f"model_{i:05d}" for i in range(len(model_keys))]
    models = [
        (mid, p, [u.file_id for u in enrollment[enrol_utts * k : enrol_utts * (k + 1)]])
        for k, (mid, (s, p)) in enumerate(zip(model_ids, model_keys, strict=True))
    ]
    trials = _draw_trials(rng, model_ids, model_keys, evaluation, trials_per_model)
    if free_text:
        pool = _in_languages(FREE_TEXT, languages)
        free, free_trials = _free_text(
            seed, eval_spk, free_text, free_text_trials, len(test_pairs), model_ids, model_keys,
            pool,
        )  # fmt: skip
        evaluation, trials = evaluation + free, trials + free_trials
    if free_text_train:
        pool = _in_languages(TRAIN_FREE_TEXT, languages)
        train = train + _train_free_text(seed, speakers, free_text_train, len(train_pairs), pool)
    train_speaker_ids = [f"spk_{i + 1:06d}" for i in range(speakers)]
    return CorpusPlan(train, enrollment, evaluation, models, trials, train_speaker_ids)


def _draw_trials(rng, model_ids, model_keys, evaluation, trials_per_model):
    """All TC trials of each model, and a seeded sample of each non-target condition."""
    trials = []
    for mid, (spk, phrase) in zip(model_ids, model_keys, strict=True):
        by_condition = {c: [] for c in ("TC", "TW", "IC", "IW")}
        for utt in evaluation:
            condition = condition_of(utt.speaker == spk, utt.phrase_id == phrase)
            by_condition[condition].append(utt.file_id)
        chosen = list(by_condition["TC"])
        for condition in ("TW", "IC", "IW"):
            pool = by_condition[condition]
            count = min(trials_per_model[condition], len(pool))
            chosen += [pool[i] for i in rng.choice(len(pool), count, replace=False)]
        labels = {fid: c for c, fids in by_condition.items() for fid in fids}
        trials += [(mid, fid, labels[fid]) for fid in rng.permutation(chosen)]
    return trials


def _free_text_utterances(seed, stream, pool, speakers, per_speaker, first_number, subdir):
    """``per_speaker`` sentences of ``pool`` said by each of ``speakers``, and the random stream.

    Drawn from the stream ``[seed, stream]`` (apart from the rest of the corpus); file ids
    (``trn_`` or ``evl_`` by ``subdir``) follow ``first_number``, numbered in a random order.
    """
    rng = np.random.default_rng([seed, stream])
    numbers = first_number + 1 + rng.permutation(len(speakers) * per_speaker)
    prefix = {"train": "trn", "evaluation": "evl"}[subdir]
    utterances = []
    for k, spk in enumerate(speakers):
        for j, sentence in enumerate(rng.choice(sorted(pool), per_speaker, replace=False)):
            i = k * per_speaker + j
            file_id = f"{prefix}_{numbers[i]:06d}"
            utterances.append(Utterance(file_id, subdir, spk, str(sentence), (seed, stream, i)))
    return utterances, rng


def _in_languages(sentences: dict, languages) -> dict:
    """The free-text sentences in ``languages`` (all of them for None)."""
    if languages is None:
        return sentences
    return {key: (lang, text) for key, (lang, text) in sentences.items() if lang in languages}


def _free_text(
    seed, eval_spk, per_speaker, per_model, first_number, model_ids, model_keys, pool=FREE_TEXT
):
    """Free-text evaluation utterances and their TW trials (see ``plan_corpus``)."""
    if per_speaker > len(pool) or per_model > per_speaker:
        raise ValueError(f"free_text <= {len(pool)} and free_text_trials <= free_text")
    utterances, rng = _free_text_utterances(
        seed, 5, pool, eval_spk, per_speaker, first_number, "evaluation"
    )
    by_speaker = {}
    for utt in utterances:
        by_speaker.setdefault(utt.speaker, []).append(utt.file_id)
    trials = []
    for mid, (spk, _) in zip(model_ids, model_keys, strict=True):
        chosen = rng.choice(by_speaker[spk], per_model, replace=False)
        trials += [(mid, str(fid), "TW") for fid in chosen]
    return utterances, trials


def _train_free_text(seed, speakers, per_speaker, first_number, pool=TRAIN_FREE_TEXT):
    """Free-text training utterances (of ``TRAIN_FREE_TEXT``), numbered after the others."""
    if per_speaker > len(pool):
        raise ValueError(f"free_text_train <= {len(pool)}")
    utterances, _ = _free_text_utterances(
        seed, 6, pool, range(speakers), per_speaker, first_number, "train"
    )
    return utterances


def _listed_phrase(phrase_id: str) -> str:
    """The phrase id a docs list gives: free-text sentences are all ``FREE_TEXT_ID``."""
    return phrase_id if phrase_id in PHRASES else FREE_TEXT_ID


def _key_line(model_id: str, test_id: str, condition: str) -> str:
    """A key line: ``model-id evaluation-file-id target|nontarget TC|TW|IC|IW``."""
    return f"{model_id} {test_id} {'target' if condition == 'TC' else 'nontarget'} {condition}"


TRIALS_HEADER = "model-id evaluation-file-id"
KEY_HEADER = "model-id evaluation-file-id target-type trial-type"


def _write_docs(out: Path, plan: CorpusPlan, layout: str = "sdsv", genders=()) -> None:
    """The docs/ lists of the layout's release, and the trial keys that real data keeps secret.

    ``genders``: ``m`` / ``f`` of each speaker (``tdsv2024``). The lists of the other layout
    are removed, so the folder holds one release.
    """
    docs = out / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for stale in _layout_files(out, "tdsv2024" if layout == "sdsv" else "sdsv"):
        stale.unlink(missing_ok=True)
    train_lines = ["train-file-id speaker-id phrase-id"] + [
        f"{u.file_id} {plan.train_speaker_ids[u.speaker]} {_listed_phrase(u.phrase_id)}"
        for u in sorted(plan.train, key=lambda u: u.file_id)
    ]
    files = {docs / "train_labels.txt": train_lines}
    if layout == "sdsv":
        files.update(_sdsv_lists(docs, plan))
    else:
        files.update(_tdsv2024_lists(out, plan, genders))
    for path, lines in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _layout_files(out: Path, layout: str) -> list[Path]:
    """The list files this script writes for ``layout`` (keys included: in ``keys/`` for TdSV)."""
    prefixes = RELEASES[LAYOUTS[layout]].values()
    keys = out / ("docs" if layout == "sdsv" else "keys")
    lists = [out / "docs" / name for prefix in prefixes for name in list_names(prefix)]
    return lists + [keys / f"{prefix}trials_key.txt" for prefix in prefixes]


def _sdsv_lists(docs: Path, plan: CorpusPlan) -> dict[Path, list[str]]:
    """SdSV 2020-21's official list pair (five columns) and its key, in docs/."""
    model_lines = ["model-id phrase-id enroll-file-id1 enroll-file-id2 enroll-file-id3"] + [
        f"{mid} {p} {' '.join(fids)}" for mid, p, fids in plan.models
    ]
    return {
        docs / "model_enrollment.txt": model_lines,
        docs / "trials.txt": [TRIALS_HEADER] + [f"{m} {t}" for m, t, _ in plan.trials],
        docs / "trials_key.txt": [KEY_HEADER] + [_key_line(*trial) for trial in plan.trials],
    }


def _tdsv2024_lists(out: Path, plan: CorpusPlan, genders) -> dict[Path, list[str]]:
    """TdSV 2024's dev and eval list pairs (six columns), keys in ``keys/`` (see the module).

    The first third of the evaluation speakers (at least one) are the dev speakers: the two
    pairs differ in size.
    """
    speaker_of = {u.file_id: u.speaker for u in plan.enrollment}
    model_speaker = {mid: speaker_of[fids[0]] for mid, _, fids in plan.models}
    speakers = sorted(set(model_speaker.values()))
    if len(speakers) < 2:
        raise ValueError("--layout tdsv2024 needs at least 2 evaluation speakers (dev and eval)")
    dev_speakers = set(speakers[: max(1, len(speakers) // 3)])
    files, renamed = {}, {}
    for split, prefix in RELEASES[LAYOUTS["tdsv2024"]].items():
        models = [
            m for m in plan.models if (model_speaker[m[0]] in dev_speakers) == (split == "dev")
        ]
        renamed.update({m[0]: f"{split}_model_{i + 1:06d}" for i, m in enumerate(models)})
        files[out / "docs" / f"{prefix}model_enrollment.txt"] = [
            "model-id phrase-id gender enroll-file-id1 enroll-file-id2 enroll-file-id3"
        ] + [
            f"{renamed[mid]} {p} {genders[model_speaker[mid]]} {' '.join(fids)}"
            for mid, p, fids in models
        ]
        own = {m[0] for m in models}
        trials = [(renamed[m], t, c) for m, t, c in plan.trials if m in own]
        files[out / "docs" / f"{prefix}trials.txt"] = [TRIALS_HEADER] + [
            f"{m} {t}" for m, t, _ in trials
        ]
        files[out / "keys" / f"{prefix}trials_key.txt"] = [KEY_HEADER] + [
            _key_line(*trial) for trial in trials
        ]
    return files


def _clear_previous_corpus(out: Path) -> None:
    """Empty the wav folders of an earlier (other-sized or unfinished) synthetic corpus.

    Refuses to touch a folder that holds audio this script did not write (e.g. real data).
    """
    owner_mark = out / ".written_by_synth_deepmine"
    if not owner_mark.exists() and any((out / "wav").glob("*/*.wav")):
        raise FileExistsError(f"{out} holds audio that synth_deepmine.py did not write")
    out.mkdir(parents=True, exist_ok=True)
    owner_mark.touch()
    (out / "synth_options.json").unlink(missing_ok=True)
    for subdir in ("train", "enrollment", "evaluation"):
        folder = out / "wav" / subdir
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.wav"):
            old.unlink()


#: A small corpus (6 training + 3 eval speakers, 4 repetitions, free text) for tests and smoke
#: checks: 378 utterances, about a minute to synthesize on 2 cores.
SMALL_CORPUS = dict(
    speakers=6, eval_speakers=3, reps=4, seed=7, free_text=2, free_text_trials=1, free_text_train=2
)


def synthesize_corpus(
    out,
    speakers: int = 40,
    eval_speakers: int = 20,
    reps: int = 6,
    seed: int = 1234,
    jobs: int = 2,
    trials_per_model: dict[str, int] | None = None,
    free_text: int = 0,
    free_text_trials: int = 0,
    free_text_train: int = 0,
    layout: str = "sdsv",
) -> Path:
    """Write the synthetic corpus to ``out``, its lists in ``layout``'s form; return its path.

    Skips the work when ``out`` already holds a complete corpus made with the same options;
    rewrites only the lists when it holds the same audio in the other layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    out = Path(out)
    trials_per_model = trials_per_model or {"TW": 3, "IC": 6, "IW": 3}
    options = dict(
        speakers=speakers,
        eval_speakers=eval_speakers,
        reps=reps,
        seed=seed,
        trials_per_model=trials_per_model,
        free_text=free_text,
        free_text_trials=free_text_trials,
        free_text_train=free_text_train,
        texts=texts_digest(),
    )
    done_marker = out / "synth_options.json"
    written = json.loads(done_marker.read_text()) if done_marker.is_file() else None
    same_audio = (
        isinstance(written, dict) and {k: v for k, v in written.items() if k != "layout"} == options
    )
    if same_audio and written.get("layout", "sdsv") == layout:
        print(f"Synthetic corpus already in {out} (same options): skipping generation.")
        return out
    plan = plan_corpus(
        seed, speakers, eval_speakers, reps, trials_per_model, free_text, free_text_trials,
        free_text_train,
    )  # fmt: skip
    genders = [gender(s) for s in draw_speakers(seed, speakers + eval_speakers)]
    if same_audio:
        _write_docs(out, plan, layout, genders)
        done_marker.write_text(json.dumps({**options, "layout": layout}))
        print(f"Rewrote the lists of the synthetic corpus in {out} in the {layout} layout.")
        return out
    _clear_previous_corpus(out)
    seconds = render_plan(
        out, plan, seed, speakers + eval_speakers, jobs, DEEPMINE_TEXTS,
        lambda utt: wav_path(out, utt.subdir, utt.file_id),
    )  # fmt: skip
    _write_docs(out, plan, layout, genders)
    done_marker.write_text(json.dumps({**options, "layout": layout}))
    _say_written(out, plan, seconds, speakers, eval_speakers)
    return out


def render_plan(out: Path, plan: CorpusPlan, seed, n_speakers, jobs, texts, path_of) -> float:
    """Draw the speakers, then render and write every utterance of ``plan``; seconds written.

    ``texts``: ``(language, text)`` of each phrase or sentence id of the plan; ``path_of``: the
    file of an ``Utterance``. Babble is made of the plan's own pass-phrases. Writes
    ``synth_speakers.json`` (each speaker's identity) in ``out``.
    """
    _init_espeak()
    phrases = sorted({u.phrase_id for u in plan.enrollment})
    babble_phrases = None if texts is DEEPMINE_TEXTS else [texts[p] for p in phrases]
    _SHARED.update(
        out=out,
        speakers=draw_speakers(seed, n_speakers),
        babble=_fork_map(partial(babble_bank, phrases=babble_phrases), [seed], 1)[0],
        texts=texts,
        path_of=path_of,
    )
    utterances = plan.train + plan.enrollment + plan.evaluation
    chunks = [utterances[i : i + CHUNK] for i in range(0, len(utterances), CHUNK)]
    durations = _fork_map(_write_chunk, chunks, jobs)
    speaker_table = {i: asdict(s) for i, s in enumerate(_SHARED["speakers"])}
    (out / "synth_speakers.json").write_text(json.dumps(speaker_table, indent=1))
    return float(sum(durations))


def _say_written(out: Path, plan: CorpusPlan, seconds: float, speakers, eval_speakers) -> None:
    """One line: what the corpus in ``out`` holds."""
    utterances = len(plan.train) + len(plan.enrollment) + len(plan.evaluation)
    print(
        f"Wrote {utterances} utterances ({seconds / 3600:.2f} h) of "
        f"{speakers}+{eval_speakers} speakers, {len(plan.models)} models and "
        f"{len(plan.trials)} trials to {out}"
    )


def main(argv=None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="corpus folder to write")
    parser.add_argument("--speakers", type=int, default=40, help="training speakers")
    parser.add_argument("--eval_speakers", type=int, default=20, help="evaluation speakers")
    parser.add_argument("--reps", type=int, default=6, help="repetitions of each phrase")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--free_text", type=int, default=0, help="free-text sentences per evaluation speaker"
    )
    parser.add_argument(
        "--free_text_trials", type=int, default=0, help="free-text TW trials per model"
    )
    parser.add_argument(
        "--free_text_train", type=int, default=0, help="free-text sentences per training speaker"
    )
    parser.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    parser.add_argument(
        "--layout", default="sdsv", choices=sorted(LAYOUTS),
        help="the official lists' form: sdsv (SdSV 2020-21) or tdsv2024 (dev and eval pairs)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    synthesize_corpus(
        args.out,
        args.speakers,
        args.eval_speakers,
        args.reps,
        args.seed,
        args.jobs,
        free_text=args.free_text,
        free_text_trials=args.free_text_trials,
        free_text_train=args.free_text_train,
        layout=args.layout,
    )


if __name__ == "__main__":
    main()
