"""Text-dependent verification with an exported folder's ONNX model: no torch, no SpeechBrain.

Needs ``onnxruntime``, ``numpy`` and ``soundfile`` only. ``recipes/export_model.py`` writes
``model.onnx`` (fp32) and ``model.int8.onnx`` (dynamically quantized) into the export folder,
with this file (as ``tdsv_onnx_verifier.py``, ``trial_decisions.py`` inlined: one file) beside
them, and
what a decision needs (thresholds, fusion, costs, audio limits) under ``"onnx"`` in
``export.json``. Run from the folder (or with it on ``sys.path``)::

    from tdsv_onnx_verifier import OnnxVerifier

    verifier = OnnxVerifier("path/to/export")            # or model="model.int8.onnx"
    verdict = verifier.verify_trial(["e1.wav", "e2.wav", "e3.wav"], "test.wav")
    print(verdict.score, verdict.accept, verdict.reason)

The model maps a raw 16 kHz waveform ``wav [1, samples]`` (any length) to the outputs named in
``export.json`` (``speaker``, and with a phrase branch ``phrase_logp`` and ``phrase_embedding``);
the features, the fused LLR and the decision are ``TrialDecisions``', the same code the
SpeechBrain folder runs, so both backends decide alike (``export_model.py`` checks it before it
publishes the folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import soundfile

# An exported folder's copy holds trial_decisions.py's code here instead (export_model.py).
from recipes.model.trial_decisions import (
    DecisionDataError,
    TrialDecisions,
    check_decisions,
    check_model_outputs,
    scorable_waveform,
)

#: Where an export folder describes its ONNX models (the ``"onnx"`` entry of this file).
EXPORT_FACTS = "export.json"


def read_settings(folder: Path) -> dict:
    """The ``"onnx"`` settings of an export folder (``EXPORT_FACTS``); a clear error without."""
    facts = folder / EXPORT_FACTS
    if not facts.is_file():
        raise FileNotFoundError(
            f"{folder}: no {EXPORT_FACTS}; not an export of this recipe, or an unfinished one "
            "(the export writes it last)"
        )
    try:
        settings = json.loads(facts.read_text(encoding="utf-8")).get("onnx")
    except (ValueError, AttributeError) as error:  # truncated, or not a JSON object
        raise DecisionDataError(f"{facts}: not a JSON object ({error})") from None
    if settings is not None and not isinstance(settings, dict):
        raise DecisionDataError(f"{facts}: 'onnx' is {type(settings).__name__}, not a mapping")
    if not settings:
        raise FileNotFoundError(
            f"{folder}: this export has no ONNX model (exported with export_onnx: false): "
            "export it again"
        )
    return settings


def read_cohort(path: Path) -> np.ndarray:
    """The cohort array of an export (``cohort.npy``): numbers only, a damaged file named."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:  # missing, truncated, or an object array
        raise DecisionDataError(f"{path}: not a readable array of numbers ({error})") from None


class OnnxVerifier(TrialDecisions):
    """An exported folder's ONNX model with the folder's thresholds and fusion.

    Arguments:
    ---------
    folder : str or Path
        The export folder (``export.json``, the ONNX models, ``cohort.npy`` where the fusion
        weights the quality measure "cohort").
    model : str, optional
        The ONNX file in ``folder`` (default the fp32 ``model.onnx``; ``model.int8.onnx``: the
        quantized copy).
    threads : int, optional
        onnxruntime's intra-op threads (default: its own choice).
    resampler : callable, optional
        ``resampler(samples [T, C] float32, rate) -> mono [T']`` at the model's rate, for files
        at another rate; without one such a file is refused, naming both rates.
    settings : dict, optional
        The ``"onnx"`` settings, instead of ``export.json``'s (the export checks its folder so
        before writing that file).

    """

    def __init__(self, folder, model=None, threads=None, resampler=None, settings=None):
        self.folder = Path(folder)
        source = f"{self.folder / EXPORT_FACTS} ('onnx')" if settings is None else "settings"
        settings = settings or read_settings(self.folder)
        check_decisions(settings, source)
        self.hparams = SimpleNamespace(**settings)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        path = self.folder / (model or settings["model"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX model in the export folder")
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.outputs = [output.name for output in self.session.get_outputs()]
        cohort = settings.get("cohort")
        self.cohort = None if cohort is None else read_cohort(self.folder / cohort)
        self.resampler = resampler
        probe = self.embed_waveform(np.zeros(settings["sample_rate"], np.float32))
        check_model_outputs(probe, settings, self.cohort, f"{source} with {path}")

    def has_fusion(self) -> bool:
        """True when the model checks the pass-phrase and fuses (phrase outputs + fusion)."""
        return "phrase_logp" in self.outputs and bool(self.hparams.fusion)

    def cohort_matrix(self) -> np.ndarray:
        """The training speakers of the quality measure "cohort" (``cohort.npy``), ``[S, D]``."""
        return self.cohort

    def embed_waveform(self, wav) -> dict:
        """The model's outputs ``{name: [D]}`` for one waveform ``[T]``, and its ``"seconds"``."""
        wav = np.asarray(wav, dtype=np.float32).reshape(1, -1)
        values = self.session.run(None, {"wav": wav})
        outputs = {name: v.reshape(-1) for name, v in zip(self.outputs, values, strict=True)}
        return {**outputs, "seconds": wav.shape[1] / self.hparams.sample_rate}

    def load_audio(self, path) -> np.ndarray:
        """A mono waveform at the model's rate: channels averaged, checked, cut as training cut."""
        try:
            samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except Exception as error:  # soundfile's messages do not always name the file
            raise RuntimeError(f"cannot read audio {path}: {error}") from error
        if samples.shape[0] == 0:
            raise ValueError(f"{path}: the audio file has no samples")
        target = self.hparams.sample_rate
        channels = samples.shape[1]
        changes = [f"down-mixed {channels} channels to mono"] if channels > 1 else []
        if rate != target:
            if self.resampler is None:
                raise ValueError(
                    f"{path}: sampled at {rate} Hz; this model takes {target} Hz: resample it "
                    f"first (e.g. sox {path} -r {target} out.wav)"
                )
            changes.insert(0, f"resampled {rate} -> {target} Hz")
            wav = np.asarray(self.resampler(samples, rate), dtype=np.float32)
        else:
            wav = samples.mean(axis=1)
        return scorable_waveform(path, wav, target, self.hparams, changes)

    def verify_enrolment(self, enrol_paths, test_path, threshold=None):
        """Score (the fused LLR, or the cosine without a fusion) and decision of a trial."""
        verdict = self.verify_trial(enrol_paths, test_path, threshold=threshold)
        return verdict.score, verdict.accept

    def verify_files(self, path_x, path_y, threshold=None):
        """Score and decision for two audio files (one enrollment utterance)."""
        return self.verify_enrolment([path_x], path_y, threshold)
