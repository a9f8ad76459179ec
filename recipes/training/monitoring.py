"""What a training run watches besides its loss: waiting for data, gradients, its log on resume.

``TrainingMonitor`` is a mixin of the recipe's ``sb.core.Brain``:

- the share of each epoch's training time spent between steps, mostly waiting for the data loader
  (``train_log.txt``'s ``data_wait_share``; a warning above ``max_data_wait_share``);
- SpeechBrain's non-finite gradient check with one host sync per step instead of one per tensor;
- on resuming, the lines of ``train_log.txt`` that the recovered checkpoint does not hold.
"""

from __future__ import annotations

import time

import speechbrain as sb
import torch
from speechbrain.utils.logger import get_logger

from recipes.training.checkpointing import trim_train_log

logger = get_logger(__name__)


class TrainingMonitor:
    """Data-wait timing, gradient checks and the train log's epochs (a ``Brain`` mixin).

    The Brain sets ``max_data_wait_share`` (the share above which an epoch's wait is a warning).
    """

    max_data_wait_share = 1.0

    # Time between one training step's end and the next one's start: mostly waiting for the
    # data loader. (fit_batch ends by copying the loss to the host, so the GPU is done by then.)
    _data_wait, _first_batch_start, _last_batch_end = 0.0, None, None

    def on_fit_start(self):
        """The Brain's start (which recovers a checkpoint), then the log trimmed to match it."""
        super().on_fit_start()
        completed = self.hparams.epoch_counter.current
        if sb.utils.distributed.if_main_process():
            dropped = trim_train_log(self.hparams.train_logger.save_file, completed)
            if dropped:
                logger.warning(
                    "train_log.txt: dropped the line(s) of epoch(s) %s, logged after the last "
                    "checkpoint (epoch %d): they are trained again",
                    ", ".join(map(str, dropped)), completed,
                )  # fmt: skip

    def on_fit_batch_start(self, batch, should_step):
        """Time the wait for this batch."""
        now = time.perf_counter()
        if self._last_batch_end is None:  # the first batch's wait is the workers' start-up
            self._first_batch_start = now
        else:
            self._data_wait += now - self._last_batch_end
        super().on_fit_batch_start(batch, should_step)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Note when the step ended (after the other hooks)."""
        super().on_fit_batch_end(batch, outputs, loss, should_step)
        self._last_batch_end = time.perf_counter()

    def on_stage_start(self, stage, epoch=None):
        """Reset the data-wait timer at the start of a training epoch."""
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TRAIN:
            self._data_wait, self._first_batch_start, self._last_batch_end = 0.0, None, None

    def data_wait_share(self) -> float:
        """Share of this epoch's training time spent between steps (waiting for data)."""
        if self._last_batch_end is None:
            return 0.0
        return self._data_wait / max(self._last_batch_end - self._first_batch_start, 1e-9)

    def epoch_train_stats(self, stage_loss) -> dict:
        """The epoch's training statistics for the log; a warning when it waited for data."""
        wait = self.data_wait_share()
        if wait > self.max_data_wait_share:
            logger.warning(
                "training waited for data %.0f %% of the time: raise num_workers (now %s)",
                100 * wait,
                self.hparams.train_dataloader_options.get("num_workers", 0),
            )
        return {"loss": stage_loss, "data_wait_share": round(wait, 3)}

    def check_gradients(self):
        """SpeechBrain's check (a non-finite gradient is dropped), with one host sync per step.

        SpeechBrain's loop reads one flag per parameter into Python: ~200 GPU syncs per step for
        WavLM Base+ (``tests/benchmarks/bench_syncs.py``). Here the norms come from one
        multi-tensor kernel and are read once; a gradient whose norm overflows is dropped too.
        """
        params = [p for p in self.modules.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        finite = torch.isfinite(torch.stack(torch._foreach_norm([p.grad for p in params])))
        if bool(finite.all()):
            return
        for param, is_finite in zip(params, finite.tolist(), strict=True):
            if not is_finite:
                param.grad = None
                logger.warning("non-finite gradient of shape %s dropped", tuple(param.shape))
