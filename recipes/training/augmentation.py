"""Additive noise read by the data-loader workers, mixed in the training step.

SpeechBrain's ``AddNoise`` loads whole noise files through a loader of its own inside the
training step (``num_workers: 0`` in the main process): on a GPU that is dead time that the
epoch's ``data_wait_share`` cannot see, since it falls inside the step. Here the training
pipeline reads one noise crop per utterance in the loader's workers (``noise_reader``, the
``noise`` item of each batch), and ``PrefetchedNoise``, an ``AddNoise`` with the same SNR mixing,
mixes the batch's crops in; ``Augmenter`` still picks it among the other augmentations.
"""

from __future__ import annotations

import soundfile as sf
import speechbrain as sb
import torch
from speechbrain.augment.time_domain import AddNoise
from speechbrain.dataio.dataio import read_audio

from data_prep.manifests import check_utf8
from recipes.training.randomness import NOISE, TrainingRandomness, crop_start


class PrefetchedNoise(AddNoise):
    """``AddNoise`` on the noise crops of the current batch (``use``); white noise without them.

    Arguments are ``AddNoise``'s mixing ones (``snr_low``, ``snr_high``, ``normalize``, ...);
    the noise files come from the data side (``noise_reader``), not from ``csv_file``.
    """

    def __init__(self, **kwargs):
        if kwargs.get("csv_file") is not None:
            raise ValueError("PrefetchedNoise reads no csv_file: the noise comes with each batch")
        super().__init__(**kwargs)
        self.batch_noise = None

    def use(self, noise: torch.Tensor, lengths: torch.Tensor) -> None:
        """The next batch's noise crops ``[B, T]`` and their relative lengths ``[B]``."""
        self.batch_noise = (noise, lengths)

    def forward(self, waveforms, lengths):
        """Noisy ``waveforms`` ``[B, T]`` at a random SNR each (``AddNoise``'s mixing)."""
        # AddNoise makes white noise when it has no csv_file, else calls _load_noise.
        self.csv_file = None if self.batch_noise is None else "the batch's noise crops"
        return super().forward(waveforms, lengths)

    def _load_noise(self, lengths, max_length):
        """The batch's crops, each repeated to ``max_length`` samples; lengths ``[B, 1]``."""
        noise, relative = self.batch_noise
        if noise.shape[0] != lengths.shape[0]:
            raise ValueError(f"{noise.shape[0]} noise crops for a batch of {lengths.shape[0]}")
        noise = noise.to(lengths.device)
        valid = torch.round(relative.to(lengths.device) * noise.shape[1]).long().clamp(min=1)
        # Speed perturbation may have stretched the speech past its crop: repeat the noise.
        index = torch.arange(max_length, device=noise.device)[None, :] % valid[:, None]
        return noise.gather(1, index), torch.full_like(valid, max_length)[:, None]


def noise_reader(
    noise_csv,
    data_folder,
    sample_rate: int,
    crop_samples: int,
    check: bool,
    randomness: TrainingRandomness,
):
    """A data-pipeline function: a random ``crop_samples`` crop of a random noise file.

    The file and the crop are keyed by the utterance and the epoch (``randomness``), as the
    speech crop is: a resumed epoch mixes the same noise.
    ``noise_csv`` is a SpeechBrain extended CSV (``ID,duration,wav,...``, ``$data_root`` taken as
    ``data_folder``). ``check``: read every file's header now and refuse, naming the file and its
    line, one that cannot be read or has another sample rate (a noise list of the user's; the
    recipe's own, training utterances, was checked by data prep).
    """
    check_utf8(noise_csv)  # SpeechBrain's reader would fail on another encoding, naming nothing
    rows = sb.dataio.dataio.load_data_csv(noise_csv, replacements={"data_root": str(data_folder)})
    files = [(row["wav"], int(float(row["duration"]) * sample_rate)) for row in rows.values()]
    if not files:
        raise ValueError(f"{noise_csv}: no noise files listed")
    if check:
        for line, (path, _) in enumerate(files, start=2):
            _check_noise_file(noise_csv, line, path, sample_rate)

    @sb.utils.data_pipeline.takes("id")
    @sb.utils.data_pipeline.provides("noise")
    def noise(utterance_id):
        """One noise crop for an utterance (read in a loader worker)."""
        rng = randomness.for_utterance(utterance_id, NOISE)
        path, frames = files[int(rng.integers(len(files)))]
        start = crop_start(rng, frames, crop_samples)
        try:
            crop = read_audio({"file": path, "start": start, "stop": start + crop_samples})
        except Exception as error:  # soundfile's message may not name the file
            raise RuntimeError(f"cannot read noise file {path} ({noise_csv}): {error}") from error
        return crop if crop.dim() == 1 else crop.mean(-1)

    return noise


def _check_noise_file(noise_csv, line: int, path: str, sample_rate: int) -> None:
    """Refuse a noise file that cannot be read or is not at ``sample_rate``."""
    try:
        rate = sf.info(path).samplerate
    except Exception as error:
        raise ValueError(f"{noise_csv} line {line}: cannot read {path}: {error}") from error
    if rate != sample_rate:
        raise ValueError(
            f"{noise_csv} line {line}: {path} is at {rate} Hz, the recipe at {sample_rate} Hz"
        )
