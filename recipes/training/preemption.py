"""Pre-emption: a scheduler's SIGTERM / SIGUSR1, or Ctrl-C, ends training at a checkpoint.

Cluster schedulers signal a job (SLURM: SIGTERM, or SIGUSR1 with ``--signal``) some seconds
before they kill it. Without a handler Python dies at once (SIGTERM: exit 143, no message) or
prints a KeyboardInterrupt traceback (SIGINT), and everything since the last interval checkpoint
is trained again. With ``Preemption`` installed, training finishes the optimizer step it is in,
saves a mid-epoch checkpoint (SpeechBrain's: model, optimizers, schedulers, epoch counter and the
data loader's position), logs one line and exits with ``128 + signal`` (SIGTERM 143, SIGINT 130,
SIGUSR1 138, as a shell reports a signal), so that rerunning the same command resumes there. In
validation it exits after the epoch's checkpoint; a second Ctrl-C exits at once (a repeated
SIGTERM / SIGUSR1 is the same request, as when torchrun forwards one). The handlers are
installed for ``fit`` only: in data prep and final scoring the signals keep their usual effect
(nothing to save there; a rerun redoes that work from its caches).

Under ``torchrun`` the processes agree before they stop, every ``DISTRIBUTED_CHECK_STEPS``
optimizer steps (one small all-reduce: a per-step one would add a GPU sync to every step), so a
signal that reaches one worker stops them all at the same step. Signal ``torchrun`` (or the whole
job, as SLURM does): it forwards the signal to its workers, waits for them, and reports it.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
from speechbrain.utils.logger import get_logger

logger = get_logger(__name__)

#: The signals that end training at a checkpoint.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: Under torchrun, how often (optimizer steps) the processes compare their stop requests.
DISTRIBUTED_CHECK_STEPS = 10


def worker_init(user_init, worker_id: int) -> None:
    """A data loader worker's start: signals from others than its parent are ignored.

    A scheduler signals every process of a job, the loader's workers too, and a torch worker dies
    on a SIGTERM its parent did not send (and on SIGUSR1): the step then fails instead of ending
    at a checkpoint. The training process stops them itself. A SIGTERM from the parent (the
    loader shutting down, or ``multiprocessing`` at exit) still ends the worker, as in torch.
    Then ``user_init`` (if any).
    """
    for signum in SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
    _exit_on_sigterm_from_parent()
    if user_init is not None:
        user_init(worker_id)


def _exit_on_sigterm_from_parent() -> None:
    """Block SIGTERM in this process; a thread exits it when the parent is the sender.

    Only ``sigwaitinfo`` tells who sent a signal (a Python handler is not told).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_parent() -> None:
        """Take every SIGTERM; exit (as torch's handler does) when the parent sent it."""
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=wait_for_parent, name="sigterm-from-parent", daemon=True).start()


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
        """Request a stop at the next safe point; exit at once when inactive or on a 2nd Ctrl-C.

        A scheduler's signal that comes again while the stop is under way is the same request:
        ``torchrun`` forwards SIGTERM to workers that SLURM already signalled, and exiting on it
        would lose the checkpoint the first one asked for.
        """
        name = signal.Signals(signum).name
        if self.active and self.signum is not None and signum != signal.SIGINT:
            logger.info("%s received again: already stopping at the next checkpoint", name)
            return
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


class PreemptibleTraining:
    """A ``Brain`` mixin: a stop request ends ``fit`` at a checkpoint (``Preemption``).

    Mid-epoch, at the next optimizer step (SpeechBrain's intra-epoch checkpoint); during
    validation, after the epoch's checkpoint (``stop_if_requested``).
    """

    _preemption = None

    @property
    def preemption(self) -> Preemption:
        """The stop requests of this Brain (its ``Preemption``)."""
        if self._preemption is None:
            self._preemption = Preemption()
        return self._preemption

    @preemption.setter
    def preemption(self, value: Preemption) -> None:
        """Use ``value`` (a test's, say) for this Brain's stop requests."""
        self._preemption = value

    def on_fit_start(self):
        """Signals are stop requests from here (before SpeechBrain's start recovers)."""
        self.preemption.active = True  # SIGTERM / SIGUSR1 / SIGINT: stop at a checkpoint
        super().on_fit_start()

    def fit(self, *args, **kwargs):
        """SpeechBrain's ``fit`` with the pre-emption handlers installed (restored after it).

        A signal after ``fit`` (final scoring) ends the run at once: nothing is left to save.
        """
        previous = self.preemption.install()
        try:
            return super().fit(*args, **kwargs)
        finally:
            self.preemption.active = False
            self.preemption.restore(previous)

    def _should_save_intra_epoch_ckpt(self, last_ckpt_time, steps_since_ckpt):
        """SpeechBrain's interval checkpoints, and one when a stop is requested.

        Never mid-accumulation: the checkpoint would lose the accumulated gradients, and a run
        resumed from it would differ from the uninterrupted one (an interval checkpoint waits
        for the optimizer step). Under torchrun both questions are collectives (SpeechBrain
        broadcasts its interval decision), so they are asked every ``DISTRIBUTED_CHECK_STEPS``
        optimizer steps, not after every batch: an interval checkpoint comes up to that many
        steps late.
        """
        if self.step % self.grad_accumulation_factor:
            return False
        if self.distributed_launch and self.optimizer_step % DISTRIBUTED_CHECK_STEPS:
            return False
        self._stop_signal = self.preemption.requested(self.device, self.distributed_launch)
        if self._stop_signal is not None:
            return True
        return super()._should_save_intra_epoch_ckpt(last_ckpt_time, steps_since_ckpt)

    _stop_signal = None

    def _save_intra_epoch_ckpt(self):
        """SpeechBrain's mid-epoch checkpoint; then, if a stop was requested, the exit."""
        super()._save_intra_epoch_ckpt()
        if self._stop_signal is not None:
            self._exit_preempted("mid-epoch checkpoint saved")

    def _exit_preempted(self, what: str) -> None:
        """Log where the run stopped and exit with the signal's code (``preemption``)."""
        name = signal.Signals(self._stop_signal).name
        code = exit_code(self._stop_signal)
        logger.warning(
            "%s: %s at epoch %d, step %d; rerun the same command to resume (exit %d)",
            name, what, self.hparams.epoch_counter.current, self.step, code,
        )  # fmt: skip
        raise SystemExit(code)

    def stop_if_requested(self, what: str) -> None:
        """Exit as ``_exit_preempted`` when any process was asked to stop (a collective)."""
        self._stop_signal = self.preemption.requested(self.device, self.distributed_launch)
        if self._stop_signal is not None:
            self._exit_preempted(what)
