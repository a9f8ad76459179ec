"""Evaluation across the processes of a ``torchrun`` job: each embeds its share, once.

SpeechBrain shards only the training data; validation and test sets are run whole by every
process. Here each process embeds every N-th utterance of a (length-sorted) dataset, the tables
are gathered, and the scoring, which can need gigabytes for 10M trials, runs on the main
process while the others wait for its results. With one process every function is the identity.
"""

from __future__ import annotations

import torch
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process
from speechbrain.utils.logger import get_logger

logger = get_logger(__name__)


def rank_and_count() -> tuple[int, int]:
    """The rank of this process and the number of processes (``(0, 1)`` without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shard(dataset):
    """The share of a SpeechBrain dataset for this process: every N-th utterance in its order.

    Striding a longest-first order gives every process about the same amount of audio.
    """
    rank, count = rank_and_count()
    if count == 1:
        return dataset
    mine = set(dataset.data_ids[rank::count])
    return dataset.filtered_sorted(key_test={"id": mine.__contains__})


def gathered(per_utterance: dict[str, dict], total: int | None = None) -> dict[str, dict]:
    """``{name: {utterance id: vector}}`` of every process, merged (on every process).

    With ``total`` (the dataset's size), the main process logs each process's share of it.
    """
    parts = [per_utterance]
    if rank_and_count()[1] > 1:
        parts = [None] * rank_and_count()[1]
        torch.distributed.all_gather_object(parts, per_utterance)
    if total is not None:
        shares = [len(next(iter(part.values()), {})) for part in parts]
        logger.info(
            "embedded %d of %d utterances on %d process(es): %s",
            sum(shares), total, len(shares), " + ".join(map(str, shares)),
        )  # fmt: skip
    if len(parts) == 1:
        return per_utterance
    merged: dict[str, dict] = {}
    for part in parts:
        for name, vectors in part.items():
            merged.setdefault(name, {}).update(vectors)
    return merged


def on_main(function, *args, **kwargs):
    """``function(*args, **kwargs)`` on the main process; its result on every process."""
    result = function(*args, **kwargs) if if_main_process() else None
    return ddp_broadcast(result)


def main_writes(function, *args, **kwargs) -> None:
    """Run ``function`` (which writes files) on the main process; the others wait for it."""
    if if_main_process():
        function(*args, **kwargs)
    ddp_barrier()
