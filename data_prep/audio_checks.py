"""Audio checks shared by data prep, training, the recipe's scoring and the inference class / CLI.

A file is usable when it exists, decodes, is mono at the expected sample rate, holds every sample
its header declares (a truncated copy is caught; libsndfile silently reports the shorter length),
is at least ``min_seconds`` long, has only finite samples and carries some signal energy (digital
silence would score as a perfect match of two silent files). Each check returns a reason that
names what is wrong; callers add the file name (or raise ``AudioError``, which carries it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf

#: The loudest 25 ms frame of a usable file must reach this level. Recorded speech, even quiet
#: and far-field, peaks tens of dB above it; digital silence and a constant offset do not.
SILENCE_DBFS = -60.0
FRAME_SECONDS = 0.025
#: Default shortest usable file: the WavLM convolutions and the heads' context need a few frames
#: (a 0.01 s file fails deep inside the model with "Kernel size can't be greater...").
MIN_SECONDS = 0.3


class AudioError(ValueError):
    """An audio file (named in the message) cannot be scored or trained on."""


def declared_wav_frames(path) -> int | None:
    """The number of frames a RIFF/WAVE header declares, or None if not a WAV or not declared.

    Streaming writers leave the data size at 0 or 0xFFFFFFFF: those count as not declared.
    """
    with open(path, "rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = None
        while len(chunk := handle.read(8)) == 8:
            kind, size = chunk[:4], int.from_bytes(chunk[4:], "little")
            if kind == b"data":
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            body = handle.read(size + size % 2)  # chunks are padded to an even size
            if kind == b"fmt " and len(body) >= 14:
                block_align = int.from_bytes(body[12:14], "little")
    return None


def _unreadable(path: Path, error) -> str:
    """The reason for a file that libsndfile cannot open (which also says so for a missing one)."""
    if not Path(path).is_file():
        return "missing file"
    return f"unreadable audio ({str(error).strip()})"


def _header_reason(path, handle, sample_rate: int) -> tuple[float, str | None]:
    """``(duration, None)`` if an open SoundFile's header is usable, else ``(0, why)``."""
    if handle.samplerate != sample_rate:
        return 0.0, f"sample rate {handle.samplerate} Hz, expected {sample_rate}"
    if handle.channels != 1:
        return 0.0, f"{handle.channels} channels, expected mono"
    if handle.frames == 0:
        return 0.0, "empty audio (0 samples)"
    declared = declared_wav_frames(path)
    if declared is not None and declared > handle.frames:
        return 0.0, (
            f"truncated: the header declares {declared / sample_rate:.3f} s, the file holds "
            f"{handle.frames / sample_rate:.3f} s"
        )
    return handle.frames / handle.samplerate, None


def waveform_problem(samples, sample_rate: int, min_seconds: float = MIN_SECONDS) -> str | None:
    """Why ``samples`` (a 1-D array or tensor) cannot be used, or None when they can."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if samples.size < min_seconds * sample_rate:
        return f"too short ({samples.size / sample_rate:.3f} s, minimum {min_seconds} s)"
    finite = np.isfinite(samples)
    if not finite.all():
        first = int(np.argmin(finite))
        return (
            f"{int((~finite).sum())} non-finite sample(s) (NaN or inf), the first at "
            f"{first / sample_rate:.3f} s"
        )
    loudest = loudest_frame_dbfs(samples, sample_rate)
    if loudest < SILENCE_DBFS:
        return (
            f"no speech energy (silence): the loudest {FRAME_SECONDS * 1000:.0f} ms frame is at "
            f"{loudest:.0f} dBFS, below {SILENCE_DBFS:.0f} dBFS"
        )
    return None


def loudest_frame_dbfs(samples: np.ndarray, sample_rate: int) -> float:
    """The level (dBFS) of the loudest non-overlapping frame, each frame's mean removed."""
    frame = max(1, int(FRAME_SECONDS * sample_rate))
    count = samples.size // frame
    frames = samples[: count * frame].reshape(count, frame) if count else samples[None]
    centred = frames - frames.mean(axis=1, keepdims=True)  # float32: a float64 copy costs 2x
    power = float(np.einsum("ij,ij->i", centred, centred).max()) / frames.shape[1]
    return 10 * np.log10(max(power, 1e-20))


class FileCheck(NamedTuple):
    """What ``file_problem`` found: the duration, why the file is unusable, its samples' hash."""

    duration: float
    reason: str | None
    digest: str = ""  # SHA-1 of the samples as read: the audio's identity, not its file's


def file_problem(path, sample_rate: int, min_seconds: float = MIN_SECONDS) -> FileCheck:
    """``(duration, None, digest)`` for a usable file, else ``(0, reason, "")``.

    The header is checked, then every sample. One open per file; 16-bit PCM (DeepMine's
    format) is read as integers and scaled, which is twice as fast as libsndfile's float
    conversion and cannot hold NaN. The digest of the samples read costs little beside
    decoding them (data prep records it: the manifests' audio identity).
    """
    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as handle:
            duration, reason = _header_reason(path, handle, sample_rate)
            if reason:
                return FileCheck(0.0, reason)
            integer = handle.subtype == "PCM_16"
            samples = handle.read(dtype="int16" if integer else "float32")
    except (RuntimeError, sf.LibsndfileError) as error:
        return FileCheck(0.0, _unreadable(path, error))
    digest = hashlib.sha1(np.ascontiguousarray(samples).tobytes()).hexdigest()
    if integer:
        samples = samples.astype(np.float32) * np.float32(1 / 32768)
    reason = waveform_problem(samples, sample_rate, min_seconds)
    return FileCheck(0.0, reason) if reason else FileCheck(duration, None, digest)


def check_waveform(samples, sample_rate: int, name, min_seconds: float = MIN_SECONDS):
    """``samples`` unchanged, or ``AudioError`` naming ``name`` and what is wrong."""
    reason = waveform_problem(samples, sample_rate, min_seconds)
    if reason:
        raise AudioError(f"{name}: {reason}")
    return samples


def check_finite(samples, name):
    """``samples`` unchanged, or ``AudioError`` when one is NaN or inf (cheap: for training)."""
    if not bool(np.isfinite(np.asarray(samples)).all()):
        raise AudioError(f"{name}: non-finite samples (NaN or inf)")
    return samples
