#!/usr/bin/env python3
"""Fine-tune WavLM for text-dependent speaker verification (DeepMine / SdSV / TdSV task 1).

WavLM -> weighted sum of its layers -> x-vector (or ECAPA-TDNN) head -> cosine classifier ->
AM-Softmax / AAM-Softmax, and a pass-phrase branch on the same WavLM pass, trained on random crops;
validated each epoch by the trial-based EER of a speaker-disjoint validation split (of the fused
LLR when speaker and phrase scores are fused), keeping the best checkpoint by it; then the best
checkpoint is scored on every split, the official lists' answer files written
(``recipes/evaluation/verification.py``). Everything is wired in the YAML; the data side
lives in ``recipes/experiment.py``.

    python recipes/train_speaker_embeddings.py hparams/synthetic_demo.yaml            # CPU demo
    python recipes/train_speaker_embeddings.py hparams/wavlm_td.yaml --data_folder /data/task1
    torchrun --nproc_per_node=4 recipes/train_speaker_embeddings.py hparams/wavlm_td.yaml ...

Rerunning the same command after an interruption resumes from the last checkpoint; a run that
already finished only re-evaluates.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import speechbrain as sb
import torch
from speechbrain.utils.logger import get_logger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.distributed import gathered, on_main, shard
from recipes.evaluation.scoring import EmbeddingTable
from recipes.evaluation.verification import (
    check_validation_split,
    covered_trials,
    run_verification,
    validation_pass_metrics,
)
from recipes.experiment import (
    RecipeData,
    add_noise_crops,
    assembled_model,
    check_phrase_classes,
    data_free_model,
    dataio_prep,
    prepare_data,
    train_loader_options,
)
from recipes.init_from import start_from, starting_model
from recipes.model.speaker_model import per_utterance, scoring_outputs
from recipes.settings import load_checked_hparams, raw_settings, seal_record
from recipes.training.checkpointing import MODEL_RECOVERABLE
from recipes.training.fine_tuning import WavLMFineTuning
from recipes.training.monitoring import TrainingMonitor
from recipes.training.preemption import PreemptibleTraining, worker_init
from recipes.training.randomness import TrainingRandomness
from recipes.training.resume_guard import guard_data, guard_settings
from recipes.training.schedules import derive_total_steps

logger = get_logger(__name__)


class SpeakerBrain(TrainingMonitor, WavLMFineTuning, PreemptibleTraining, sb.core.Brain):
    """Trains the speaker embedding model and the phrase branch; scores validation each epoch.

    ``phrase_labels`` (constructor) are the phrase classifier's classes in output order; the
    training length and the validation trials come through ``use_data`` before ``fit``.
    """

    def __init__(self, *args, phrase_labels=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.phrase_labels = list(phrase_labels or [])
        self.steps_per_epoch, self.valid = 1, None
        self.randomness = TrainingRandomness(self.hparams.seed)
        # What the mixins (recipes/training/fine_tuning.py, monitoring.py) take from the YAML:
        wavlm, head = self.hparams.wavlm_opt_class, self.hparams.head_opt_class
        self.optimizer_classes = {"wavlm": wavlm, "head": head}
        self.l2sp_weight = self.hparams.l2sp_weight
        self.max_data_wait_share = self.hparams.max_data_wait_share
        self.remember_wavlm_weights()

    def use_data(self, steps_per_epoch: int, valid, randomness: TrainingRandomness = None) -> None:
        """What training needs from the data: batches per epoch (margin warm-up), the validation.

        ``randomness``: the ``TrainingRandomness`` that the training crops are drawn with; the
        Brain sets its epoch and seeds each step by it (default: its own, of ``seed``).
        """
        self.steps_per_epoch, self.valid = max(1, steps_per_epoch), valid
        self.randomness = randomness or self.randomness

    def compute_forward(self, batch, stage):
        """The model's outputs (``WavLMSpeakerEmbedder``); when training, embeddings and logits.

        A batch without padding (every utterance fills the crop, or a batch of one) goes to the
        encoder without lengths, so it takes the faster unmasked path. This is read from the lengths
        while they are still on the host (no GPU sync); the augmentations keep a batch's
        lengths as they are (tested).
        """
        padded = bool((batch.sig.lengths < 1).any())
        batch = batch.to(self.device, non_blocking=True)  # asynchronous from pinned memory
        wavs, lens = batch.sig
        if stage == sb.Stage.TRAIN and self.hparams.augment:
            noise = getattr(batch, "noise", None)  # read by the loader's workers
            if noise is not None:
                self.hparams.add_noise.use(*noise)  # recipes/training/augmentation.py
            wavs, lens = self.hparams.wav_augment(wavs, lens)
        # In the warm-up epochs WavLM's weights do not require gradients (set_wavlm_frozen):
        # autograd keeps nothing of its pass, but its layer weights still learn.
        outputs = self.modules.embedding_model(wavs, lens if padded else None, all_outputs=True)
        if stage != sb.Stage.TRAIN:
            return scoring_outputs(outputs)
        embeddings = outputs["speaker"]
        logits = {"class": self.modules.classifier(embeddings)}
        if "phrase_logits" in outputs:
            logits["phrase_branch"] = outputs["phrase_logits"]
        return embeddings, logits

    def compute_objectives(self, predictions, batch, stage):
        """Margin softmax loss (+ the phrase branch's) in training; else keep scoring outputs."""
        if stage != sb.Stage.TRAIN:
            for name, vectors in per_utterance(predictions).items():
                vectors = vectors.cpu().numpy()
                self.embeddings.setdefault(name, {}).update(zip(batch.id, vectors, strict=True))
            return torch.zeros((), device=self.device)
        _, logits = predictions
        targets = self._targets(batch.class_encoded.data)
        loss = self.modules.loss(logits["class"], targets)
        if "phrase_branch" in logits:  # its posteriors are what is scored
            phrase_targets = self._targets(batch.phrase_encoded.data)[:, 0]
            branch_loss = self.model().phrase_branch.loss(logits["phrase_branch"], phrase_targets)
            loss = loss + self.hparams.phrase_loss_weight * branch_loss
        return loss + self.regularization()

    def _targets(self, targets):
        """Targets repeated like the batch when augmentation adds copies of it."""
        if self.hparams.augment:
            return self.hparams.wav_augment.replicate_labels(targets)
        return targets

    def on_fit_batch_start(self, batch, should_step):
        """Tell the loss how far training is (margin warm-up); key this step's random draws."""
        super().on_fit_batch_start(batch, should_step)
        progress = self.hparams.epoch_counter.current - 1 + self.step / self.steps_per_epoch
        self.unwrapped("loss").set_progress(progress)
        # Augmentation and dropout keyed by the step: a resumed epoch repeats them exactly.
        self.randomness.seed_step(self.step)

    def on_stage_start(self, stage, epoch=None):
        """Start collecting embeddings for validation and test; set a training epoch's draws."""
        self.embeddings = {}
        if stage == sb.Stage.TRAIN and epoch is not None:  # before its loader starts workers
            self.randomness.set_epoch(epoch)
        super().on_stage_start(stage, epoch)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log training loss; score the validation trials; keep the best checkpoint by EER."""
        if stage == sb.Stage.TRAIN:
            self.train_stats = self.epoch_train_stats(stage_loss)
            return
        stats = self._validation_metrics()
        meta = {"epoch": epoch, **self.schedule_stats()}
        self.hparams.train_logger.log_stats(
            stats_meta=meta, train_stats=self.train_stats, valid_stats=stats
        )
        if self.hparams.use_tensorboard and sb.utils.distributed.if_main_process():
            self.tensorboard.log_stats(meta, self.train_stats, stats)
        self.checkpointer.save_and_keep_only(
            meta=stats, min_keys=["EER"], num_to_keep=self.hparams.ckpt_num_to_keep
        )
        self.stop_if_requested("end-of-epoch checkpoint saved")  # a signal during validation

    def make_dataloader(self, dataset, stage, *args, **kwargs):
        """SpeechBrain's loaders; under ``torchrun`` each process validates on its share.

        Their workers leave the stop signals to this process (``preemption.worker_init``).
        """
        if stage == sb.Stage.VALID:
            dataset = shard(dataset)  # SpeechBrain would run the whole set on every process
        kwargs["worker_init_fn"] = partial(worker_init, kwargs.get("worker_init_fn"))
        return super().make_dataloader(dataset, stage, *args, **kwargs)

    def _validation_metrics(self) -> dict:
        """Pooled EER / minDCF of the validation trials from this epoch's outputs.

        Every process's share of the outputs is gathered; the main process scores, and every
        process gets its numbers (the best checkpoint is chosen by them).
        """
        tables = {
            name: EmbeddingTable.from_dict(d) for name, d in gathered(self.embeddings).items()
        }
        return on_main(self._metrics_of, tables)

    def _metrics_of(self, tables: dict) -> dict:
        """``validation_pass_metrics`` from all of the validation utterances' tables."""
        models, trials = self.valid.models, self.valid.trials
        if self.debug:  # --debug embeds only a few batches: score the trials they cover
            models, trials = covered_trials(models, trials, set(tables["speaker"].ids))
        return validation_pass_metrics(
            tables, models, trials, self.phrase_labels, self.hparams.fusion,
            self.hparams.fusion_prior,
        )  # fmt: skip


def noise_list(hparams):
    """The noise list whose crops the loader's workers read; None when noise is not added.

    Only ``PrefetchedNoise`` takes crops from the loader (``add_noise.use``).
    """
    on = hparams["augment"] and hparams["aug_noise"] and hparams["noise_csv"]
    return hparams["noise_csv"] if on and hasattr(hparams["add_noise"], "use") else None


def schedule_lengths(hparams, batches_per_epoch: int) -> dict[str, int]:
    """``derive_total_steps`` for the YAML's schedules and this run's length (logged)."""
    return derive_total_steps(
        hparams["lr_schedulers"],
        batches_per_epoch,
        accumulation=hparams["grad_accumulation_factor"],
        epochs=hparams["number_of_epochs"],
        frozen_epochs=hparams["freeze_wavlm_epochs"],
    )


def build_brain(hparams, run_opts, n_classes: int, n_phrases: int, phrase_labels=None):
    """Complete the modules whose size depends on the data, and create the Brain.

    ``phrase_labels`` name the phrase classes (default: ``n_phrases`` numbered ones).
    """
    modules = {
        "classifier": hparams["classifier"](out_neurons=n_classes),
        "loss": hparams["loss"](n_classes=n_classes),
    }
    wiring = hparams["recipe_settings"].model
    modules = {MODEL_RECOVERABLE: assembled_model(wiring, n_phrases), **modules}
    checkpointer = hparams["checkpointer"]
    for name, module in modules.items():
        checkpointer.add_recoverable(name, module)
    brain = SpeakerBrain(
        modules=modules,
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=checkpointer,
        phrase_labels=phrase_labels or [f"{i + 1:02d}" for i in range(n_phrases)],
    )
    if hparams["use_tensorboard"] and sb.utils.distributed.if_main_process():
        brain.tensorboard = hparams["tensorboard_logger"]()
    return brain


def brain_for_data(hparams, run_opts, data: RecipeData) -> SpeakerBrain:
    """``build_brain`` sized and labelled by the prepared data."""
    return build_brain(
        hparams, run_opts, len(data.class_encoder), len(data.phrase_encoder), data.phrase_labels
    )


def main(argv) -> None:
    """Prepare data, train, then evaluate the best checkpoint on every split."""
    # Checked, the experiment folder held by this run, the process group set up:
    hparams_file, run_opts, overrides, hparams = load_checked_hparams(argv, lock=True)
    given = raw_settings(hparams_file, overrides)  # what this command sets, as plain values
    guard_settings(hparams["save_folder"], given)  # a resume on other settings: before writing
    settings = hparams["recipe_settings"]  # the YAML wires the steps' settings objects
    source = starting_model(hparams["init_from"], partial(data_free_model, settings.model))
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    sb.utils.distributed.run_on_main(seal_record, args=[hparams["output_folder"]])
    prepare_data(settings.corpus)
    guard_data(hparams["save_folder"], given, hparams["prep_folder"])  # ... or on other data
    data = dataio_prep(settings.corpus, settings.audio)
    train, splits = data.train, data.splits
    check_phrase_classes(data, settings.model)  # before any training
    check_validation_split(splits["valid"].trials, settings.scoring)
    # Read by the loader's workers, not in the training step:
    add_noise_crops(data, noise_list(hparams), settings.corpus, settings.audio)
    brain = brain_for_data(hparams, run_opts, data)
    if source is not None:
        start_from(source, brain, data, hparams["output_folder"])
    train_loader = brain.make_dataloader(
        train, stage=sb.Stage.TRAIN, **train_loader_options(settings.sampling, train)
    )
    brain.use_data(len(train_loader), splits["valid"], data.randomness)
    schedule_lengths(hparams, len(train_loader))
    brain.fit(
        brain.hparams.epoch_counter,
        train_loader,
        splits["valid"].utterances,
        valid_loader_kwargs=hparams["eval_dataloader_options"],
    )
    run_verification(settings.scoring, settings.model, data, run_opts)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:  # under torchrun, as torch asks: a group left to the interpreter's exit can abort it
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
