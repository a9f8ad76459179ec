"""Pre-emption: a scheduler's SIGTERM / SIGUSR1, or Ctrl-C, ends training at a checkpoint.

Cluster schedulers signal a job (SLURM: SIGTERM, or SIGUSR1 with ``--signal``) some seconds
before they kill it. Without a handler Python dies at once (SIGTERM: exit 143, no message) or
prints a KeyboardInterrupt traceback (SIGINT), and everything since the last interval checkpoint
is trained again. With ``Preemption`` installed, training finishes the optimizer step it is in,
saves a mid-epoch checkpoint (SpeechBrain's: model, optimizers, schedulers, epoch counter and the
data loader's position), logs one line and exits with ``128 + signal`` (SIGTERM 143, SIGINT 130,
SIGUSR1 138, as a shell reports a signal), so that rerunning the same command resumes there. In
validation it exits after the epoch's checkpoint; a second signal exits at once. The handlers are
installed for ``fit`` only: in data prep and final scoring the signals keep their usual effect
(nothing to save there; a rerun redoes that work from its caches).

Under ``torchrun`` the processes agree before they stop, every ``DISTRIBUTED_CHECK_STEPS``
optimizer steps (one small all-reduce: a per-step one would add a GPU sync to every step).
"""

from __future__ import annotations

import signal

import torch
from speechbrain.utils.logger import get_logger

logger = get_logger(__name__)

#: The signals that end training at a checkpoint.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: Under torchrun, how often (optimizer steps) the processes compare their stop requests.
DISTRIBUTED_CHECK_STEPS = 10


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: ``128 + signum``, as a shell reports it."""
    return 128 + int(signum)


class Preemption:
    """The stop requests of one training process, set by the signal handler.

    ``active`` while there is something to checkpoint (during ``fit``); a signal then only
    requests the stop, which the Brain takes at its next safe point (``requested``).
    """

    def __init__(self):
        self.signum, self.active = None, False

    def install(self) -> dict:
        """Handle ``SIGNALS`` (from the main thread); the handlers they had (``restore``)."""
        return {signum: signal.signal(signum, self._handle) for signum in SIGNALS}

    def restore(self, previous: dict) -> None:
        """Give the signals back the handlers ``install`` replaced."""
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        """Request a stop at the next safe point; exit at once on a repeat (or when inactive)."""
        name = signal.Signals(signum).name
        if not self.active or self.signum is not None:
            logger.warning("%s received: exiting now (exit %d)", name, exit_code(signum))
            raise SystemExit(exit_code(signum))
        self.signum = signum
        logger.warning("%s received: finishing this step, then saving a checkpoint", name)

    def requested(self, device, distributed: bool) -> int | None:
        """The signal every process stops for (None: go on); collective under ``torchrun``."""
        if not distributed:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None
