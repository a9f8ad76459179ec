"""Text-dependent verification with an exported folder's ONNX model: no torch, no SpeechBrain.

Needs ``onnxruntime``, ``numpy``, ``soundfile`` and ``pyyaml`` only. ``recipes/export_model.py``
writes ``model.onnx`` (fp32) and ``model.int8.onnx`` (dynamically quantized) into the export
folder, with this file (as ``tdsv_onnx_verifier.py``, ``trial_decisions.py`` inlined: one file)
beside them. What a decision needs (thresholds, fusion, costs, audio limits) is read from the
folder's ``hyperparams.yaml``, the same entries the SpeechBrain folder decides with (its model
wiring is skipped, nothing of it runs), and the training speakers of the quality measure
"cohort" from ``cohort.ckpt`` (a NumPy array). Run from the folder (or with it on ``sys.path``)::

    from tdsv_onnx_verifier import OnnxVerifier

    verifier = OnnxVerifier("path/to/export")            # or model="model.int8.onnx"
    verdict = verifier.verify_trial(["e1.wav", "e2.wav", "e3.wav"], "test.wav")
    print(verdict.score, verdict.accept, verdict.reason)

The model maps a raw 16 kHz waveform ``wav [1, samples]`` (any length) to its named outputs
(``speaker``, and with a phrase branch ``phrase_logp`` and ``phrase_embedding``); the features,
the fused LLR and the decision are ``TrialDecisions``', the same code the SpeechBrain folder
runs, so both backends decide alike (``export_model.py`` checks it before it publishes the
folder).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import soundfile
import yaml

# An exported folder's copy holds trial_decisions.py's code here instead (export_model.py).
from recipes.model.trial_decisions import (
    COHORT_FILE,
    DECISION_KEYS,
    DecisionDataError,
    TrialDecisions,
    check_decisions,
    check_model_outputs,
    read_cohort,
    scorable_waveform,
)

#: Where an export folder states what it is (written last: its presence marks a finished export).
EXPORT_FACTS = "export.json"
#: The ONNX models of an export folder, fp32 and int8; the graph's input (``wav [1, samples]``).
ONNX_MODEL, ONNX_INT8_MODEL, ONNX_INPUT = "model.onnx", "model.int8.onnx", "wav"


def check_finished(folder: Path) -> None:
    """Refuse an export folder without ``EXPORT_FACTS``, which an export writes last."""
    if not (folder / EXPORT_FACTS).is_file():
        raise ValueError(
            f"{folder}: no {EXPORT_FACTS}, which an export writes last: not an export of this "
            "recipe, or an unfinished one (interrupted, or still being written); export it again"
        )


class _SettingsOnly(yaml.SafeLoader):
    """PyYAML's safe loader that reads every tagged entry (the model's wiring) as nothing."""


_SettingsOnly.add_multi_constructor("!", lambda loader, suffix, node: None)


def read_decisions(folder: Path) -> dict:
    """The decision data of an export folder (``DECISION_KEYS`` of its ``hyperparams.yaml``)."""
    path = folder / "hyperparams.yaml"
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SettingsOnly)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; {folder} is not an export folder") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DecisionDataError(f"{path}: not readable as YAML ({error})") from None
    if not isinstance(data, dict):
        raise DecisionDataError(f"{path}: not a mapping of settings")
    return {key: data.get(key) for key in DECISION_KEYS}


class OnnxVerifier(TrialDecisions):
    """An exported folder's ONNX model with the folder's thresholds and fusion.

    Arguments:
    ---------
    folder : str or Path
        The export folder (``hyperparams.yaml``, the ONNX models, ``cohort.ckpt`` where the
        fusion weights the quality measure "cohort").
    model : str, optional
        The ONNX file in ``folder`` (default the fp32 ``model.onnx``; ``model.int8.onnx``: the
        quantized copy).
    threads : int, optional
        onnxruntime's intra-op threads (default: its own choice).
    resampler : callable, optional
        ``resampler(samples [T, C] float32, rate) -> mono [T']`` at the model's rate, for files
        at another rate; without one such a file is refused, naming both rates.
    decisions : dict, optional
        The decision data (``DECISION_KEYS``), instead of the folder's ``hyperparams.yaml``.
    complete : bool
        Refuse a folder without ``export.json``, which an export writes last (False: the
        export's own check of the folder it is writing).

    """

    def __init__(
        self, folder, model=None, threads=None, resampler=None, decisions=None, complete=True
    ):
        self.folder = Path(folder)
        if complete:
            check_finished(self.folder)
        source = "decisions" if decisions is not None else str(self.folder / "hyperparams.yaml")
        decisions = read_decisions(self.folder) if decisions is None else decisions
        check_decisions(decisions, source)
        self.hparams = SimpleNamespace(**decisions)
        path = self.folder / (model or ONNX_MODEL)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such ONNX model in the export folder (a folder exported with "
                "export_onnx: false has none: export it again)"
            )
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.outputs = [output.name for output in self.session.get_outputs()]
        self.cohort = None
        if "cohort" in (decisions.get("fusion") or {}).get("quality", []):
            self.cohort = read_cohort(self.folder / COHORT_FILE)
        self.resampler = resampler
        probe = self.embed_waveform(np.zeros(decisions["sample_rate"], np.float32))
        check_model_outputs(probe, decisions, self.cohort, f"{source} with {path}")

    def has_fusion(self) -> bool:
        """True when the model checks the pass-phrase and fuses (phrase outputs + fusion)."""
        return "phrase_logp" in self.outputs and bool(self.hparams.fusion)

    def cohort_matrix(self) -> np.ndarray:
        """The training speakers of the quality measure "cohort" (``cohort.ckpt``), ``[S, D]``."""
        return self.cohort

    def embed_waveform(self, wav) -> dict:
        """The model's outputs ``{name: [D]}`` for one waveform ``[T]``, and its ``"seconds"``."""
        wav = np.asarray(wav, dtype=np.float32).reshape(1, -1)
        values = self.session.run(None, {ONNX_INPUT: wav})
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
