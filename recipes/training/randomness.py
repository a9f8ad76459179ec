"""Training's randomness as a function of where training is, so that a resumed run repeats it.

A run stopped mid-epoch (pre-emption, ``recipes/training/preemption.py``) and resumed must train
exactly as the uninterrupted run would have: same crops, same noise, same augmentations, same
dropout. Saving the random generators' states in the checkpoint is not enough here:

- the crops and noise crops are drawn in the data loader's worker processes, whose generators
  are seeded from the main process when each epoch's iterator starts, and a resumed epoch's
  batches go to other workers (SpeechBrain's loader skips the batches already done);
- between the checkpoint and the next step, a resumed run draws from the main process's
  generators where the uninterrupted one did not (the iterator's worker seeds, validation).

So every draw is keyed by its position instead (counter-based randomness):

- data side (``for_utterance``): a generator seeded by ``(seed, epoch, utterance id, purpose)``,
  whatever worker, batch size or ``num_workers`` reads the utterance;
- step side (``seed_step``): before each training batch, torch's (CPU and CUDA), Python's and
  NumPy's global generators are seeded by ``(seed, epoch, step, rank)``: SpeechBrain's
  ``Augmenter`` (Python's ``random``), its augmentations and dropout (torch's) draw from them.

The cost is one small seeding per utterance and per batch (microseconds). On one machine a
resumed run equals the uninterrupted one bit for bit (``tests/test_reliability.py``); another
machine's kernels may still differ in the last bits (docs/design.md).
"""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

#: ``for_utterance`` purposes: independent streams for the crop and the noise of one utterance.
CROP, NOISE = 0, 1


def _key(text: str) -> int:
    """A stable 64-bit key of ``text`` (Python's ``hash`` of a string changes per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class TrainingRandomness:
    """The run's seed and the epoch being trained: what every training draw is keyed by.

    The training script sets the epoch (``set_epoch``) before each epoch's loader starts its
    workers, which then see it (the loader's workers are started per epoch: ``persistent_workers``
    is refused at start-up for this reason).
    """

    def __init__(self, seed: int):
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose draws come next."""
        self.epoch = int(epoch)

    def for_utterance(self, utterance_id: str, purpose: int) -> np.random.Generator:
        """A generator for one draw of ``purpose`` (``CROP``, ``NOISE``) on one utterance."""
        return np.random.default_rng([self.seed, self.epoch, _key(utterance_id), purpose])

    def seed_step(self, step: int, rank: int | None = None) -> None:
        """Seed the global generators for training step ``step`` of this epoch on ``rank``."""
        if rank is None:
            rank = int(os.environ.get("RANK", 0))
        state = np.random.SeedSequence([self.seed, self.epoch, int(step), rank]).generate_state(3)
        torch.manual_seed(int(state[0]))  # CPU and every CUDA device
        random.seed(int(state[1]))
        np.random.seed(int(state[2]))


def crop_start(rng: np.random.Generator, frames: int, crop: int) -> int:
    """A uniformly drawn first sample of a ``crop``-sample crop of a ``frames``-sample file."""
    return int(rng.integers(0, max(0, frames - crop) + 1))
