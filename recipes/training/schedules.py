"""The learning-rate schedule, its length derived from the data when the YAML does not set it.

SpeechBrain's ``WarmAndExpDecayLRSchedule`` needs ``total_steps`` when it is built, that is when the
YAML is loaded, before data prep knows how many batches an epoch has; a number set by hand is wrong
as soon as the data, the batch size, the accumulation or the number of GPUs change.
"""

from __future__ import annotations

import math

from speechbrain.nnet.schedulers import WarmAndExpDecayLRSchedule
from speechbrain.utils.logger import get_logger

logger = get_logger(__name__)


class WarmAndExpDecayToEnd(WarmAndExpDecayLRSchedule):
    """SpeechBrain's warm-up then exponential decay (to ``lr * decay_factor`` at ``total_steps``).

    ``total_steps: null`` defers the length to ``set_total_steps`` (see ``derive_total_steps``).
    Saved and resumed as SpeechBrain's (a resumed run keeps the length it started with).
    """

    def __init__(self, lr, n_warmup_steps, total_steps=None, decay_factor=0.1):
        super().__init__(lr, n_warmup_steps, total_steps or n_warmup_steps + 1, decay_factor)
        self.derived = total_steps is None

    def set_total_steps(self, total_steps: int) -> None:
        """Decay over the steps that follow the warm-up, to ``total_steps``."""
        self.decay_steps = max(1, total_steps - self.n_warmup_steps)


def derive_total_steps(
    schedules: dict, batches_per_epoch: int, *, accumulation: int, epochs: int, frozen_epochs: int
) -> dict[str, int]:
    """Set the length of each schedule built with ``total_steps: null``; ``{name: steps}``.

    ``schedules`` maps optimizer names to their schedules. An optimizer steps once per
    ``accumulation`` batches, and WavLM's (``"wavlm"``) only in the epochs after the
    ``frozen_epochs`` of its warm-up.
    """
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    derived = {}
    for name, schedule in schedules.items():
        if getattr(schedule, "derived", False):
            frozen = frozen_epochs if name == "wavlm" else 0
            derived[name] = max(1, (epochs - frozen) * steps_per_epoch)
            schedule.set_total_steps(derived[name])
    if derived:
        logger.info(
            "total_steps derived: %d epochs x %d optimizer steps per epoch -> %s",
            epochs, steps_per_epoch, derived,
        )  # fmt: skip
    return derived
