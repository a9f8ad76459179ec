"""Batching helpers SpeechBrain lacks.

- ``PhraseBatchSampler``: every batch holds utterances of one pass-phrase. SpeechBrain has
  length-based batch samplers but none that groups by a label; text-dependent training benefits
  from batches in which speakers must be told apart while saying the same text.
- ``collate_readable``: SpeechBrain's ``PaddedBatch`` of the examples whose audio could be read,
  for ``on_bad_audio: skip`` (the audio pipeline gives ``None`` for an unreadable file).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from speechbrain.dataio.batch import PaddedBatch
from torch.utils.data import Sampler


class PhraseBatchSampler(Sampler):
    """Batches of ``batch_size`` indices sharing a phrase, in a seeded order that changes per epoch.

    Each epoch visits every utterance once; a phrase's last, smaller batch is kept (nothing is
    dropped). Call ``set_epoch`` (SpeechBrain does) to reshuffle.
    """

    def __init__(self, phrase_ids, batch_size: int, seed: int = 0):
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        groups = defaultdict(list)
        for index, phrase in enumerate(phrase_ids):
            groups[phrase].append(index)
        self.groups = [np.array(v) for _, v in sorted(groups.items())]

    def set_epoch(self, epoch: int) -> None:
        """Choose the order of the next epoch."""
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        """The epoch's batches: each phrase's utterances shuffled and cut, the batches shuffled."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for group in self.groups:
            order = rng.permutation(group)
            batches += [
                order[i : i + self.batch_size].tolist()
                for i in range(0, len(order), self.batch_size)
            ]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self.groups)


def log_bad_audio(log_path, wav, error) -> None:
    """Append one unreadable training file and the reason to the log (one line, tab-separated)."""
    reason = " ".join(str(error).split())
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(f"{wav}\t{reason}\n")


def collate_readable(examples) -> PaddedBatch:
    """Batch the examples whose audio was read; unreadable ones (``sig`` None) are left out."""
    kept = [example for example in examples if example["sig"] is not None]
    if not kept:
        raise RuntimeError("every utterance of a batch was unreadable (see on_bad_audio's log)")
    return PaddedBatch(kept)
