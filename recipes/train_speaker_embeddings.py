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

import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import NamedTuple

import speechbrain as sb
import torch
from speechbrain.utils.logger import get_logger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.distributed import gathered, on_main, shard
from recipes.evaluation.scoring import EmbeddingTable
from recipes.evaluation.verification import (
    ScoringSettings,
    check_validation_split,
    run_verification,
    validation_pass_metrics,
)
from recipes.experiment import (
    AudioSettings,
    CorpusSettings,
    ModelWiring,
    RecipeData,
    SamplingSettings,
    add_noise_crops,
    assembled_model,
    check_phrase_classes,
    dataio_prep,
    prepare_data,
    train_loader_options,
)
from recipes.model.adaptation import WavLMTuning
from recipes.model.modules import L2SP
from recipes.model.speaker_model import per_utterance, scoring_outputs
from recipes.settings import load_checked_hparams, raw_settings, seal_record
from recipes.training.checkpointing import MODEL_RECOVERABLE, trim_train_log
from recipes.training.init_from import start_from, starting_model
from recipes.training.preemption import (
    DISTRIBUTED_CHECK_STEPS,
    Preemption,
    exit_code,
    worker_init,
)
from recipes.training.randomness import TrainingRandomness
from recipes.training.resume_guard import guard_data, guard_settings
from recipes.training.schedules import derive_total_steps

logger = get_logger(__name__)


class SpeakerBrain(sb.core.Brain):
    """Trains the speaker embedding model and the phrase branch; scores validation each epoch.

    ``phrase_labels`` (constructor) are the phrase classifier's classes in output order; the
    training length and the validation trials come through ``use_data`` before ``fit``.
    """

    def __init__(self, *args, phrase_labels=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.phrase_labels = list(phrase_labels or [])
        self.steps_per_epoch, self.valid = 1, None
        self.randomness = TrainingRandomness(self.hparams.seed)
        self.preemption = Preemption()
        # WavLM's own trainable weights (not the frozen CNN, not the layer weights): frozen in
        # the warm-up epochs by requires_grad, so they are fixed here, before any freezing.
        self.wavlm_weights = [p for p in self.model().encoder.model.parameters() if p.requires_grad]

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
        if "phrase_classifier" in self.modules:
            logits["phrase"] = self.modules.phrase_classifier(embeddings)
        if "phrase_logits" in outputs:
            logits["phrase_branch"] = outputs["phrase_logits"]
        return embeddings, logits

    def compute_objectives(self, predictions, batch, stage):
        """Margin softmax loss (+ phrase losses) when training; else keep outputs for scoring."""
        if stage != sb.Stage.TRAIN:
            for name, vectors in per_utterance(predictions).items():
                vectors = vectors.cpu().numpy()
                self.embeddings.setdefault(name, {}).update(zip(batch.id, vectors, strict=True))
            return torch.zeros((), device=self.device)
        _, logits = predictions
        targets = self._targets(batch.class_encoded.data)
        loss = self.modules.loss(logits["class"], targets)
        weight = self.hparams.phrase_loss_weight
        if "phrase" in logits or "phrase_branch" in logits:
            phrase_targets = self._targets(batch.phrase_encoded.data)
        if "phrase" in logits:
            loss = loss + weight * self.modules.phrase_loss(logits["phrase"], phrase_targets)
        if "phrase_branch" in logits:  # its posteriors are what is scored
            branch = self.model().phrase_branch
            loss = loss + weight * branch.loss(logits["phrase_branch"], phrase_targets[:, 0])
        if self.l2sp is not None and not self.wavlm_frozen():
            loss = loss + self.l2sp()
        return loss

    l2sp = None

    def on_fit_start(self):
        """Record WavLM's pretrained weights for L2-SP (``l2sp_weight``), then SpeechBrain's start.

        Before SpeechBrain's start, which recovers a checkpoint: a resumed run is pulled toward
        the pretrained weights too, not toward the ones it resumed from.
        """
        weight = getattr(self.hparams, "l2sp_weight", 0.0)
        if weight > 0 and self.hparams.wavlm_tuning == "full":
            self.l2sp = L2SP(self.wavlm_weights, weight)
        elif weight > 0:  # LoRA starts at the pretrained model and moves only its adapters
            logger.info("l2sp_weight unused: wavlm_tuning %s", self.hparams.wavlm_tuning)
        self.preemption.active = True  # SIGTERM / SIGUSR1 / SIGINT: stop at a checkpoint
        super().on_fit_start()
        self._forget_epochs_after_checkpoint()

    def _forget_epochs_after_checkpoint(self) -> None:
        """Drop logged epochs that the recovered checkpoint does not hold (trained again)."""
        completed = self.hparams.epoch_counter.current
        if sb.utils.distributed.if_main_process():
            dropped = trim_train_log(self.hparams.train_logger.save_file, completed)
            if dropped:
                logger.warning(
                    "train_log.txt: dropped the line(s) of epoch(s) %s, logged after the last "
                    "checkpoint (epoch %d): they are trained again",
                    ", ".join(map(str, dropped)), completed,
                )  # fmt: skip

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

    def _targets(self, targets):
        """Targets repeated like the batch when augmentation adds copies of it."""
        if self.hparams.augment:
            return self.hparams.wav_augment.replicate_labels(targets)
        return targets

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
            self.optimizers_dict["wavlm"] = self.hparams.wavlm_opt_class(self.wavlm_weights)
        self.optimizers_dict["head"] = self.hparams.head_opt_class(head_params)
        self.optimizer = self.optimizers_dict["head"]  # for SpeechBrain code that expects one
        if self.checkpointer is not None:
            for name, optimizer in self.optimizers_dict.items():
                self.checkpointer.add_recoverable(f"{name}_optimizer", optimizer)

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

    def freeze_optimizers(self, optimizers):
        """Leave WavLM's optimizer out while WavLM is frozen."""
        if self.wavlm_frozen():
            return {k: v for k, v in optimizers.items() if k != "wavlm"}
        return optimizers

    # Time between one training step's end and the next one's start: mostly waiting for the
    # data loader. (fit_batch ends by copying the loss to the host, so the GPU is done by then.)
    _data_wait, _first_batch_start, _last_batch_end = 0.0, None, None

    def on_fit_batch_start(self, batch, should_step):
        """Tell the loss how far training is (margin warm-up); time the wait for this batch."""
        now = time.perf_counter()
        if self._last_batch_end is None:  # the first batch's wait is the workers' start-up
            self._first_batch_start = now
        else:
            self._data_wait += now - self._last_batch_end
        progress = self.hparams.epoch_counter.current - 1 + self.step / self.steps_per_epoch
        self.unwrapped("loss").set_progress(progress)
        # Augmentation and dropout keyed by the step: a resumed epoch repeats them exactly.
        self.randomness.seed_step(self.step)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Advance each learning-rate schedule after its optimizer stepped."""
        if should_step:
            for name, optimizer in self.freeze_optimizers(self.optimizers_dict).items():
                self.hparams.lr_schedulers[name](optimizer)
        self._last_batch_end = time.perf_counter()

    def on_stage_start(self, stage, epoch=None):
        """Start collecting embeddings for validation and test; reset the data-wait timer."""
        self.embeddings = {}
        if stage == sb.Stage.TRAIN:
            if epoch is not None:  # before the epoch's loader starts its workers
                self.randomness.set_epoch(epoch)
            self.set_wavlm_frozen(self.wavlm_frozen())
            self._data_wait, self._first_batch_start, self._last_batch_end = 0.0, None, None

    def data_wait_share(self) -> float:
        """Share of this epoch's training time spent between steps (waiting for data)."""
        if self._last_batch_end is None:
            return 0.0
        return self._data_wait / max(self._last_batch_end - self._first_batch_start, 1e-9)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log training loss; score the validation trials; keep the best checkpoint by EER."""
        if stage == sb.Stage.TRAIN:
            wait = self.data_wait_share()
            self.train_stats = {"loss": stage_loss, "data_wait_share": round(wait, 3)}
            if wait > self.hparams.max_data_wait_share:
                logger.warning(
                    "training waited for data %.0f %% of the time: raise num_workers (now %s)",
                    100 * wait,
                    self.hparams.train_dataloader_options.get("num_workers", 0),
                )
            return
        stats = self._validation_metrics()
        meta = self._progress_stats(epoch)
        self.hparams.train_logger.log_stats(
            stats_meta=meta, train_stats=self.train_stats, valid_stats=stats
        )
        if self.hparams.use_tensorboard and sb.utils.distributed.if_main_process():
            self.tensorboard.log_stats(meta, self.train_stats, stats)
        self.checkpointer.save_and_keep_only(
            meta=stats, min_keys=["EER"], num_to_keep=self.hparams.ckpt_num_to_keep
        )
        self._stop_signal = self.preemption.requested(self.device, self.distributed_launch)
        if self._stop_signal is not None:  # a signal during validation: after its checkpoint
            self._exit_preempted("end-of-epoch checkpoint saved")

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
            done = set(tables["speaker"].ids)
            models = models[models["enrol_ids"].str.split().map(done.issuperset)]
            trials = trials[
                trials["model_id"].isin(models["model_id"]) & trials["test_id"].isin(done)
            ]
        return validation_pass_metrics(
            tables, models, trials, self.phrase_labels, self.hparams.fusion,
            self.hparams.fusion_prior,
        )  # fmt: skip

    def _progress_stats(self, epoch) -> dict:
        """What the log says about the schedule at the end of an epoch."""
        stats = {"epoch": epoch, "wavlm_frozen": self.wavlm_frozen()}
        for name, optimizer in self.optimizers_dict.items():
            stats[f"lr_{name}"] = optimizer.param_groups[0]["lr"]
        stats["margin"] = round(self.unwrapped("loss").current_margin(), 4)
        stats["scale"] = round(self.unwrapped("loss").current_scale(), 3)
        return stats


class RecipeSettings(NamedTuple):
    """The settings of every step of a run (``recipe_settings``)."""

    corpus: CorpusSettings
    audio: AudioSettings
    sampling: SamplingSettings
    scoring: ScoringSettings
    model: ModelWiring


def recipe_settings(hparams) -> RecipeSettings:
    """The settings objects that data prep, loading, sampling, scoring and the model take.

    The one place where the YAML's keys become code, each read by its name: the modules take
    these small objects, never ``hparams``. ``verify_speakers.py`` and ``export_model.py`` read
    a run the same way; ``tests/test_recipe_rows.py`` checks that every top-level key of each
    YAML is read by the script it is passed to.
    """
    corpus = CorpusSettings(
        data_folder=hparams["data_folder"],
        prep_folder=hparams["prep_folder"],
        corpus=hparams["corpus"],
        valid_speakers=hparams["valid_speakers"],
        valid_enrol_utts=hparams["valid_enrol_utts"],
        seed=hparams["seed"],
        include_free_text=hparams["include_free_text"],
        skip_bad=hparams["skip_bad"],
        enrol_utts=hparams["enrol_utts"],
        min_audio_seconds=hparams["min_audio_seconds"],
        synthetic_corpus=hparams["synthetic_corpus"],
        phrase_min_count=hparams["phrase_min_count"],
        audio_outside_data_folder=hparams["audio_outside_data_folder"],
        eval_key_file=hparams["eval_key_file"],
        dev_key_file=hparams["dev_key_file"],
    )
    audio = AudioSettings(
        sample_rate=hparams["sample_rate"],
        crop_seconds=hparams["crop_seconds"],
        max_eval_seconds=hparams["max_eval_seconds"],
        min_audio_seconds=hparams["min_audio_seconds"],
        on_bad_audio=hparams["on_bad_audio"],
        bad_audio_log=hparams["bad_audio_log"],
        target_type=hparams["target_type"],
        cohort_utts_per_speaker=hparams["cohort_utts_per_speaker"],
        save_folder=hparams["save_folder"],
    )
    sampling = SamplingSettings(
        batch_sampler=hparams["batch_sampler"],
        loader_options=hparams["train_dataloader_options"],
        seed=hparams["seed"],
        dynamic_batch_sampler=hparams["dynamic_batch_sampler"],
        on_bad_audio=hparams["on_bad_audio"],
    )
    scoring = ScoringSettings(
        output_folder=hparams["output_folder"],
        score_norm=hparams["score_norm"],
        cohort_top_k=hparams["cohort_top_k"],
        fusion=hparams["fusion"],
        fusion_prior=hparams["fusion_prior"],
        fusion_quality=tuple(hparams["fusion_quality"]),
        eval_precision=hparams["eval_precision"],
        loader_options=hparams["eval_dataloader_options"],
        max_eval_seconds=hparams["max_eval_seconds"],
        sample_rate=hparams["sample_rate"],
    )
    model = ModelWiring(
        embedding_model=hparams["embedding_model"],
        phrase_branch_model=hparams["phrase_branch_model"] if hparams["phrase_branch"] else None,
        checkpointer=hparams["checkpointer"],
        tuning=WavLMTuning(
            hparams["wavlm_tuning"],
            hparams["lora_rank"],
            hparams["lora_alpha"],
            tuple(hparams["lora_targets"]),
        ),
    )
    return RecipeSettings(corpus, audio, sampling, scoring, model)


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
    if hparams["target_type"] == "speaker+phrase":
        modules["phrase_classifier"] = hparams["phrase_classifier"](out_neurons=n_phrases)
        modules["phrase_loss"] = hparams["phrase_loss"](n_classes=n_phrases)
    wiring = recipe_settings(hparams).model
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
    settings = recipe_settings(hparams)
    source = starting_model(hparams["init_from"], settings.model)  # a misfit: refused now
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
    check_phrase_classes(data, settings.model, hparams["target_type"])  # before any training
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
