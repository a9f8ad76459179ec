"""Fine-tuning WavLM inside the recipe's Brain: warm-up freezing, two optimizers, DDP, L2-SP.

``WavLMFineTuning`` is a mixin of the recipe's ``sb.core.Brain``. WavLM's own trainable weights
(``wavlm_weights``: all of them, its LoRA adapters, or none, as ``wavlm_tuning`` leaves them
trainable) are frozen by ``requires_grad`` in the ``freeze_wavlm_epochs`` warm-up epochs (the
layer weights and heads learn), learn at ``lr_wavlm`` with their own optimizer and schedule, are
pulled toward their starting values by L2-SP, and under ``torchrun`` the model's DDP wrapper is
rebuilt when the warm-up ends (DDP registers the parameters that require gradients when built).
"""

from __future__ import annotations

import speechbrain as sb
import torch
from speechbrain.utils.logger import get_logger

from recipes.model.modules import L2SP

logger = get_logger(__name__)


class WavLMFineTuning:
    """Freezing, optimizers, DDP wrapping and L2-SP of WavLM's weights (a ``Brain`` mixin).

    The Brain sets ``optimizer_classes`` (``{"wavlm": ..., "head": ...}``, each taking its
    parameters) and ``l2sp_weight`` from its YAML.
    """

    l2sp, l2sp_weight, optimizer_classes = None, 0.0, None

    def remember_wavlm_weights(self) -> None:
        """Fix ``wavlm_weights``: WavLM's own weights that train, before any freezing.

        Not the frozen CNN, not the layer weights; the warm-up sets their ``requires_grad``.
        """
        encoder = self.model().encoder.model
        self.wavlm_weights = [p for p in encoder.parameters() if p.requires_grad]

    def on_fit_start(self):
        """Record WavLM's starting weights for L2-SP (``l2sp_weight``), then the Brain's start.

        Before SpeechBrain's start, which recovers a checkpoint: a resumed run is pulled toward
        the starting weights too (the pretrained ones, or ``init_from``'s), not toward the ones it
        resumed from.
        """
        weight = self.l2sp_weight
        if weight > 0 and self.hparams.wavlm_tuning == "full":
            self.l2sp = L2SP(self.wavlm_weights, weight)
        elif weight > 0:  # LoRA starts at the pretrained model and moves only its adapters
            logger.info("l2sp_weight unused: wavlm_tuning %s", self.hparams.wavlm_tuning)
        super().on_fit_start()

    def regularization(self) -> torch.Tensor | float:
        """L2-SP's penalty while WavLM trains (0 when it is off or WavLM is frozen)."""
        if self.l2sp is None or self.wavlm_frozen():
            return 0.0
        return self.l2sp()

    def on_stage_start(self, stage, epoch=None):
        """Freeze or unfreeze WavLM for a training epoch (``freeze_wavlm_epochs``)."""
        super().on_stage_start(stage, epoch)
        if stage == sb.Stage.TRAIN:
            self.set_wavlm_frozen(self.wavlm_frozen())

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Advance each learning-rate schedule after its optimizer stepped."""
        if should_step:
            for name, optimizer in self.freeze_optimizers(self.optimizers_dict).items():
                self.hparams.lr_schedulers[name](optimizer)
        super().on_fit_batch_end(batch, outputs, loss, should_step)

    def unwrapped(self, name: str):
        """A module without its DDP wrapper (for its own attributes and methods)."""
        module = self.modules[name]
        return (
            module.module
            if isinstance(module, torch.nn.parallel.DistributedDataParallel)
            else module
        )

    def model(self):
        """The ``WavLMSpeakerEmbedder`` being trained (without its DDP wrapper)."""
        return self.unwrapped("embedding_model")

    def _wrap_distributed(self):
        """SpeechBrain's DDP wrapping (``distributed_wrapped``) of every module that trains.

        On a GPU, BatchNorm layers become SyncBatchNorm first, as SpeechBrain does (once: the
        model is wrapped again when the warm-up ends).
        """
        if not self.distributed_launch:
            return super()._wrap_distributed()  # DataParallel, or nothing
        for name, module in self.modules.items():
            if any(p.requires_grad for p in module.parameters()):
                if str(self.device).startswith("cuda"):
                    module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
                self.modules[name] = self.distributed_wrapped(module)
        return None

    def distributed_wrapped(self, module):
        """``module`` in DDP as SpeechBrain wraps it (on CPU, gloo).

        DDP registers the parameters that require gradients when it is built, so the model is
        wrapped again when WavLM's warm-up ends (``set_wavlm_frozen``).
        """
        on_gpu = str(self.device).startswith("cuda")
        return torch.nn.parallel.DistributedDataParallel(
            module,
            device_ids=[self.device] if on_gpu else None,
            find_unused_parameters=self.find_unused_parameters,
        )

    def schedule_stats(self) -> dict:
        """What the log says about the schedule: frozen or not, learning rates, margin, scale."""
        stats = {"wavlm_frozen": self.wavlm_frozen()}
        for name, optimizer in self.optimizers_dict.items():
            stats[f"lr_{name}"] = optimizer.param_groups[0]["lr"]
        stats["margin"] = round(self.unwrapped("loss").current_margin(), 4)
        stats["scale"] = round(self.unwrapped("loss").current_scale(), 3)
        return stats

    def wavlm_frozen(self) -> bool:
        """True during the head-only warm-up epochs."""
        return self.hparams.epoch_counter.current <= self.hparams.freeze_wavlm_epochs

    def set_wavlm_frozen(self, frozen: bool) -> None:
        """Freeze or unfreeze WavLM's weights (``wavlm_weights``) by ``requires_grad``.

        Not by ``no_grad``: the encoder's layer weights must learn in the warm-up too. Under DDP
        every parameter that requires a gradient must get one in every step, so the model's
        wrapper is rebuilt (on every process, at the same epoch) when the set changes.
        """
        if all(p.requires_grad != frozen for p in self.wavlm_weights):
            return
        for parameter in self.wavlm_weights:
            parameter.requires_grad_(not frozen)
        model = self.modules["embedding_model"]
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            self.modules["embedding_model"] = self.distributed_wrapped(model.module)
        logger.info("WavLM %s", "frozen (warm-up: the head learns)" if frozen else "unfrozen")

    def init_optimizers(self):
        """Two optimizers: WavLM at a small learning rate, everything else at a large one.

        The layer weights belong to our encoder, not to the HF model, so they learn at the
        head's rate: they start uniform and must move in few steps. With ``wavlm_tuning: lora``
        WavLM's optimizer holds its adapters; with ``frozen`` there is none.
        """
        wavlm_ids = {id(p) for p in self.wavlm_weights}
        head_params = [
            p for p in self.modules.parameters() if p.requires_grad and id(p) not in wavlm_ids
        ]
        self.optimizers_dict = {}
        if self.wavlm_weights:  # none with wavlm_tuning: frozen
            self.optimizers_dict["wavlm"] = self.optimizer_classes["wavlm"](self.wavlm_weights)
        self.optimizers_dict["head"] = self.optimizer_classes["head"](head_params)
        self.optimizer = self.optimizers_dict["head"]  # for SpeechBrain code that expects one
        if self.checkpointer is not None:
            for name, optimizer in self.optimizers_dict.items():
                self.checkpointer.add_recoverable(f"{name}_optimizer", optimizer)

    def freeze_optimizers(self, optimizers):
        """Leave WavLM's optimizer out while WavLM is frozen."""
        if self.wavlm_frozen():
            return {k: v for k, v in optimizers.items() if k != "wavlm"}
        return optimizers
