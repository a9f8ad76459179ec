"""The corpus contract: the manifests every preparer writes, and how the recipe picks a preparer.

The recipe reads a text-dependent corpus only through these manifests, written to the prep folder
by the preparer that the ``corpus`` setting names (``CORPORA``). Each split (``SPLITS``) has four:

    <split>_enrol.csv        enrollment models: ``MODEL_FIELDS`` (``enrol_ids`` joined by a space;
                             ``gender`` m / f where the corpus gives it, else blank)
    <split>_enrol_utts.csv   the utterances those models are made of: ``UTT_FIELDS``
    <split>_test.csv         the test utterances: ``UTT_FIELDS``
    <split>_trials.csv       trials: ``TRIAL_FIELDS``, in the official list's order; ``label``
                             1 / 0 and ``condition`` one of ``CONDITIONS``, or both blank for a
                             blind list (scored, never reported)

``valid`` (``VALID_SPLIT``) holds out whole training speakers (``valid_speakers``): model
selection and the fusion's calibration, since an official development set may not be used for
training. ``eval`` and ``dev`` (``OFFICIAL_SPLITS``) are the corpus's own list pairs, where it
has them (TdSV 2024 ships both; SdSV 2020-21 and a Kaldi ``trials`` file give ``eval``).
Besides them:

    train.csv               utterances: ``UTT_FIELDS``. ``wav`` is ``$data_root/<path under the
                            corpus folder>`` (or an absolute path, where a setting allows audio
                            outside it); ``phrase_id`` is the corpus's own phrase id,
                            ``FREE_TEXT_ID`` for free text (no pass-phrase), blank for a blind
                            test utterance; ``phrase`` its text where known; ``language`` where
                            known.
    train_noise.csv         the training utterances in SpeechBrain's extended CSV
                            (``NOISE_FIELDS``), for babble.
    prep_options.json       what the manifests were made from (options, lists, a hash of each
                            manifest, the audio's identity, each official list's trial count):
                            a rerun with the same inputs does nothing.

Phrase classes, free text and the per-phrase, per-language and per-gender report rows come from
these columns, never from a corpus's phrase table.

A preparer is a function ``prepare(data_folder, save_folder, *, valid_speakers, seed,
include_free_text, skip_bad, enrol_utts, min_seconds, valid_enrol_utts, **corpus_options) ->
{name: path}`` that validates everything before it writes anything and raises ``DataPrepError``
(one message naming every problem with its file and line) unless ``skip_bad``.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from pathlib import Path

#: The sample rate of every audio file (WavLM's).
SAMPLE_RATE = 16000

UTT_FIELDS = ["ID", "duration", "wav", "spk_id", "phrase_id", "phrase", "language"]
MODEL_FIELDS = ["model_id", "phrase_id", "spk_id", "enrol_ids", "language", "gender"]
TRIAL_FIELDS = ["model_id", "test_id", "label", "condition"]
NOISE_FIELDS = ["ID", "duration", "wav", "wav_format", "wav_opts"]

#: The held-out-speaker split (model selection, the fusion) and the official list pairs' splits.
VALID_SPLIT = "valid"
OFFICIAL_SPLITS = ("dev", "eval")
SPLITS = (VALID_SPLIT, *OFFICIAL_SPLITS)

#: ``phrase_id`` of a free-text utterance (no pass-phrase) in every manifest.
FREE_TEXT_ID = "FT"

#: Trial conditions: (same speaker, same phrase) for each label. ``NT`` is a non-target trial
#: whose kind a key does not give (``target|nontarget`` only): it counts in the pooled numbers.
CONDITIONS = {
    "TC": (True, True), "TW": (True, False), "IC": (False, True), "IW": (False, False),
    "NT": (None, None),
}  # fmt: skip
_CONDITION_OF = {matches: label for label, matches in CONDITIONS.items() if label != "NT"}

#: ``corpus`` setting -> its preparer (``module:function``, imported when used).
CORPORA = {
    "deepmine": "data_prep.deepmine_prepare:prepare_deepmine",
    "kaldi": "data_prep.kaldi_prepare:prepare_kaldi",
}
#: The settings each preparer takes besides the common ones (``valid_speakers``, ``seed``, ...).
CORPUS_OPTIONS = {
    "deepmine": ("eval_key_file", "dev_key_file"),
    "kaldi": ("phrase_min_count", "audio_outside_data_folder"),
}


def preparer(corpus: str) -> Callable:
    """The preparer of a ``corpus`` setting (one of ``CORPORA``)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus: {corpus!r} is not one of {', '.join(CORPORA)}")
    module, function = CORPORA[corpus].split(":")
    return getattr(importlib.import_module(module), function)


def condition_of(same_speaker: bool, same_phrase: bool) -> str:
    """Trial condition label (TC, TW, IC or IW) for a pair of speaker and phrase matches."""
    return _CONDITION_OF[(bool(same_speaker), bool(same_phrase))]


def file_digest(path: Path) -> str:
    """The SHA-1 of a file's bytes: a check that a derived file is as written (not security)."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
