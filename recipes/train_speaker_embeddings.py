#!/usr/bin/env python3
"""Fine-tune WavLM for text-dependent speaker verification (DeepMine / SdSV / TdSV task 1).

WavLM -> weighted sum of its layers -> x-vector (or ECAPA-TDNN) head -> cosine classifier ->
AM-Softmax / AAM-Softmax, trained on random crops; validated each epoch by the trial-based EER of
a speaker-disjoint dev split, keeping the best checkpoint by EER. Everything is wired in the YAML.

    python recipes/train_speaker_embeddings.py hparams/synthetic_demo.yaml            # CPU demo
    python recipes/train_speaker_embeddings.py hparams/wavlm_td.yaml --data_folder /data/task1
    torchrun --nproc_per_node=4 recipes/train_speaker_embeddings.py hparams/wavlm_td.yaml ...

Rerunning the same command after an interruption resumes from the last checkpoint; a run that
already finished only re-evaluates.
"""

from __future__ import annotations

import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import speechbrain as sb
import torch
import torch.nn.functional as F
from speechbrain.dataio.dataio import read_audio
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.encoder import CategoricalEncoder
from speechbrain.utils.distributed import run_on_main
from speechbrain.utils.logger import get_logger
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.deepmine_prepare import prepare_deepmine
from data_prep.layout import PHRASES
from data_prep.synth_deepmine import synthesize_corpus
from recipes.fusion import apply_fusion, learn_fusion, trial_scores
from recipes.sampling import PhraseBatchSampler, collate_readable, log_bad_audio
from recipes.scoring import EmbeddingTable, metrics_by_condition
from recipes.settings import load_checked_hparams
from recipes.speaker_model import OTHER_PHRASE, phrase_outputs
from recipes.verification import Split, run_verification

logger = get_logger(__name__)


class SpeakerBrain(sb.core.Brain):
    """Trains the embedding model; embeds utterances and scores trials at validation and test.

    ``phrase_labels`` (constructor) are the phrase classifier's classes in output order; the
    training length and the dev trials come through ``use_data`` before ``fit``.
    """

    def __init__(self, *args, phrase_labels=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.phrase_labels = list(phrase_labels or [])
        self.steps_per_epoch, self.dev = 1, None

    def use_data(self, steps_per_epoch: int, dev) -> None:
        """What training needs from the data: batches per epoch (margin warm-up), dev ``Split``."""
        self.steps_per_epoch, self.dev = max(1, steps_per_epoch), dev

    def compute_forward(self, batch, stage):
        """Waveforms -> embeddings ``[B, 1, D]`` (+ class logits when training).

        A batch without padding (every utterance fills the crop, or a batch of one) goes to the
        encoder without lengths, so it takes the faster unmasked path. This is read from the lengths
        while they are still on the host (no GPU sync); the augmentations keep a batch's
        lengths as they are (tested).
        """
        padded = bool((batch.sig.lengths < 1).any())
        batch = batch.to(self.device, non_blocking=True)  # asynchronous from pinned memory
        wavs, lens = batch.sig
        if stage == sb.Stage.TRAIN and self.hparams.augment:
            wavs, lens = self.hparams.wav_augment(wavs, lens)
        encoder_lens = lens if padded else None
        with_phrase = "phrase_branch" in self.modules
        with torch.no_grad() if stage == sb.Stage.TRAIN and self.wavlm_frozen() else nullcontext():
            encoded = self.modules.wavlm(wavs, encoder_lens, return_hidden=with_phrase)
        feats, hidden = encoded if with_phrase else (encoded, None)
        feat_lens = self.unwrapped("wavlm").frame_lengths(lens, wavs.shape[1], feats.shape[1])
        embeddings = self.modules.embedding_model(feats, feat_lens)
        phrase = self.modules.phrase_branch(hidden, feat_lens) if with_phrase else None
        if stage != sb.Stage.TRAIN:
            if phrase is None:
                return embeddings
            return {"speaker": embeddings, **phrase_outputs(*phrase)}
        logits = {"class": self.modules.classifier(embeddings)}
        if "phrase_classifier" in self.modules:
            logits["phrase"] = self.modules.phrase_classifier(embeddings)
        if phrase is not None:
            logits["phrase_branch"] = phrase[1]
        return embeddings, logits

    def compute_objectives(self, predictions, batch, stage):
        """Margin softmax loss (+ phrase losses) when training; else keep outputs for scoring."""
        if stage != sb.Stage.TRAIN:
            outputs = predictions if isinstance(predictions, dict) else {"speaker": predictions}
            for name, values in outputs.items():
                vectors = values.reshape(values.shape[0], -1).float().cpu().numpy()
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
        if "phrase_branch" in logits:  # plain cross-entropy: posteriors are what is scored
            branch_loss = F.cross_entropy(logits["phrase_branch"].float(), phrase_targets[:, 0])
            loss = loss + weight * branch_loss
        return loss

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

    def _wrap_distributed(self):
        """SpeechBrain's DDP wrapping; on CPU (gloo) without SyncBatchNorm, which needs GPUs."""
        if not (self.distributed_launch and str(self.device).startswith("cpu")):
            return super()._wrap_distributed()
        for name, module in self.modules.items():
            if any(p.requires_grad for p in module.parameters()):
                self.modules[name] = torch.nn.parallel.DistributedDataParallel(
                    module, find_unused_parameters=self.find_unused_parameters
                )
        return None

    def wavlm_frozen(self) -> bool:
        """True during the head-only warm-up epochs."""
        return self.hparams.epoch_counter.current <= self.hparams.freeze_wavlm_epochs

    def init_optimizers(self):
        """Two optimizers: WavLM at a small learning rate, everything else at a large one.

        The layer weights belong to our encoder, not to the HF model, so they learn at the
        head's rate: they start uniform and must move in few steps.
        """
        wavlm_params = [p for p in self.unwrapped("wavlm").model.parameters() if p.requires_grad]
        wavlm_ids = {id(p) for p in wavlm_params}
        head_params = [
            p for p in self.modules.parameters() if p.requires_grad and id(p) not in wavlm_ids
        ]
        self.optimizers_dict = {
            "wavlm": self.hparams.wavlm_opt_class(wavlm_params),
            "head": self.hparams.head_opt_class(head_params),
        }
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
            self._data_wait, self._first_batch_start, self._last_batch_end = 0.0, None, None

    def data_wait_share(self) -> float:
        """Share of this epoch's training time spent between steps (waiting for data)."""
        if self._last_batch_end is None:
            return 0.0
        return self._data_wait / max(self._last_batch_end - self._first_batch_start, 1e-9)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log training loss; score the dev trials; keep the best checkpoint by EER."""
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
        stats = self._dev_metrics()
        meta = self._progress_stats(epoch)
        self.hparams.train_logger.log_stats(
            stats_meta=meta, train_stats=self.train_stats, valid_stats=stats
        )
        if self.hparams.use_tensorboard and sb.utils.distributed.if_main_process():
            self.tensorboard.log_stats(meta, self.train_stats, stats)
        self.checkpointer.save_and_keep_only(
            meta=stats, min_keys=["EER"], num_to_keep=self.hparams.ckpt_num_to_keep
        )

    def _dev_metrics(self) -> dict:
        """Pooled EER / minDCF of the dev trials from this epoch's outputs.

        The score is the system's: the speaker score, or with a fusion its LLR (the fusion learned
        on these same dev trials: three numbers, so the selection is not noticeably optimistic).
        """
        tables = {name: EmbeddingTable.from_dict(d) for name, d in self.embeddings.items()}
        models, trials = self.dev.models, self.dev.trials
        if self.debug:  # --debug embeds only a few batches: score the trials they cover
            done = set(tables["speaker"].ids)
            models = models[models["enrol_ids"].str.split().map(done.issuperset)]
            trials = trials[
                trials["model_id"].isin(models["model_id"]) & trials["test_id"].isin(done)
            ]
        if trials.empty:
            return {"EER": 100.0, "minDCF": 1.0}
        parts = trial_scores(tables, models, trials, self.phrase_labels)
        scores = parts.speaker
        if self.hparams.fusion != "none" and (trials["condition"] == "TW").any():
            fusion = learn_fusion(parts, trials["condition"], self.hparams.fusion_prior)
            scores = apply_fusion(fusion, parts, self.hparams.fusion)
        pooled = metrics_by_condition(scores, trials["condition"]).get("pooled")
        if pooled is None:
            return {"EER": 100.0, "minDCF": 1.0}
        return {"EER": round(pooled["eer"], 3), "minDCF": round(pooled["min_dcf"], 4)}

    @torch.no_grad()
    def embed(self, dataset, loader_kwargs) -> dict[str, EmbeddingTable]:
        """Tables of every utterance of ``dataset`` (eval mode, eval precision, batched).

        ``"speaker"`` embeddings and, with a phrase branch, ``"phrase_logp"`` (log-posteriors)
        and ``"phrase_embedding"``.
        """
        loader = self.make_dataloader(dataset, stage=sb.Stage.TEST, **loader_kwargs)
        self.on_stage_start(sb.Stage.TEST)
        self.modules.eval()
        for batch in tqdm(loader, desc="embedding", disable=self.noprogressbar):
            self.evaluate_batch(batch, sb.Stage.TEST)
        return {name: EmbeddingTable.from_dict(d) for name, d in self.embeddings.items()}

    def _progress_stats(self, epoch) -> dict:
        """What the log says about the schedule at the end of an epoch."""
        stats = {"epoch": epoch, "wavlm_frozen": self.wavlm_frozen()}
        for name, optimizer in self.optimizers_dict.items():
            stats[f"lr_{name}"] = optimizer.param_groups[0]["lr"]
        stats["margin"] = round(self.unwrapped("loss").current_margin(), 4)
        stats["scale"] = round(self.unwrapped("loss").current_scale(), 3)
        return stats


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def _utterances(csv_paths, data_folder) -> DynamicItemDataset:
    """One dataset over the utterance manifests ``csv_paths``."""
    data = {}
    for path in csv_paths:
        data.update(
            sb.dataio.dataio.load_data_csv(path, replacements={"data_root": str(data_folder)})
        )
    return DynamicItemDataset(data)


def dataio_prep(hparams):
    """Datasets, label encoders and trial lists; returns what ``main`` needs to train and score."""
    prep, rate = Path(hparams["prep_folder"]), hparams["sample_rate"]
    crop = int(hparams["crop_seconds"] * rate)
    max_eval = int(hparams["max_eval_seconds"] * rate)

    skip_bad, bad_log = hparams["on_bad_audio"] == "skip", hparams["bad_audio_log"]

    @sb.utils.data_pipeline.takes("wav", "duration")
    @sb.utils.data_pipeline.provides("sig")
    def train_audio(wav, duration):
        """A random crop of ``crop_seconds`` (read from disk without loading the rest).

        A file that became unreadable after data prep (deleted, truncated) stops training with
        its name, or with ``on_bad_audio: skip`` is logged and left out of its batch (None).
        """
        frames = int(float(duration) * rate)
        start = random.randint(0, max(0, frames - crop))
        try:
            sig = read_audio({"file": wav, "start": start, "stop": start + crop})
            if sig.numel() == 0:
                raise ValueError(f"no samples from {start} (prepared duration {duration} s)")
        except Exception as error:  # soundfile, torchaudio and our own errors alike
            if not skip_bad:
                raise RuntimeError(f"cannot read training audio {wav}: {error}") from error
            log_bad_audio(bad_log, wav, error)
            return None
        return sig

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def eval_audio(wav):
        """The whole utterance, capped at ``max_eval_seconds`` to bound memory."""
        return read_audio({"file": wav, "start": 0, "stop": max_eval})

    target_type = hparams["target_type"]
    if target_type not in ("speaker", "speaker_phrase", "speaker+phrase"):
        raise ValueError(
            f"target_type must be speaker, speaker_phrase or speaker+phrase: {target_type}"
        )

    @sb.utils.data_pipeline.takes("spk_id", "phrase_id")
    @sb.utils.data_pipeline.provides("class_label", "phrase_label")
    def labels(spk_id, phrase_id):
        """The training class (speaker, or speaker x phrase) and the phrase."""
        phrase = phrase_id if phrase_id in PHRASES else OTHER_PHRASE  # free text is one class
        yield f"{spk_id}_{phrase}" if target_type == "speaker_phrase" else spk_id
        yield phrase

    train = _utterances([prep / "train.csv"], hparams["data_folder"])
    train.add_dynamic_item(train_audio)
    train.add_dynamic_item(labels)
    class_encoder, phrase_encoder = CategoricalEncoder(), CategoricalEncoder()
    for encoder, name in ((class_encoder, "class"), (phrase_encoder, "phrase")):
        # DDP-safe: the main process creates the file, the others wait and load it.
        path = Path(hparams["save_folder"]) / f"{name}_encoder.txt"
        encoder.load_or_create(path, from_didatasets=[train], output_key=f"{name}_label")
        encoder.ignore_len()  # the classifiers are sized from the encoders themselves
    train.add_dynamic_item(
        class_encoder.encode_label_torch, takes="class_label", provides="class_encoded"
    )
    train.add_dynamic_item(
        phrase_encoder.encode_label_torch, takes="phrase_label", provides="phrase_encoded"
    )
    train.set_output_keys(["id", "sig", "class_encoded", "phrase_encoded", "phrase_id"])

    def eval_utterances(csv_paths) -> DynamicItemDataset:
        """Whole utterances, longest first (less padding per batch)."""
        utts = _utterances(csv_paths, hparams["data_folder"])
        utts.add_dynamic_item(eval_audio)
        utts.set_output_keys(["id", "sig"])
        return utts.filtered_sorted(sort_key="duration", reverse=True)

    splits = {}
    for split in ("dev", "eval"):
        if (prep / f"{split}_trials.csv").is_file():
            splits[split] = Split(
                eval_utterances([prep / f"{split}_enrol_utts.csv", prep / f"{split}_test.csv"]),
                pd.read_csv(prep / f"{split}_enrol.csv", dtype=str, keep_default_na=False),
                pd.read_csv(prep / f"{split}_trials.csv", dtype=str, keep_default_na=False),
            )
    cohort = _cohort_utterances(prep / "train.csv", hparams["cohort_utts_per_speaker"])
    cohort_set = (eval_utterances([cohort]), pd.read_csv(cohort, index_col="ID")["spk_id"])
    return RecipeData(train, splits, cohort_set, class_encoder, phrase_encoder)


class RecipeData(NamedTuple):
    """What ``dataio_prep`` makes: datasets, ``Split`` per split, cohort, label encoders."""

    train: DynamicItemDataset
    splits: dict
    cohort: tuple  # (dataset, speaker per utterance id)
    class_encoder: CategoricalEncoder
    phrase_encoder: CategoricalEncoder

    @property
    def phrase_labels(self) -> list[str]:
        """The phrase classes in the classifier's output order."""
        return [self.phrase_encoder.ind2lab[i] for i in range(len(self.phrase_encoder))]


def _cohort_utterances(train_csv: Path, per_speaker: int) -> Path:
    """A manifest of the first ``per_speaker`` training utterances of each speaker (by id)."""
    table = pd.read_csv(train_csv, dtype=str, keep_default_na=False).sort_values("ID")
    path = train_csv.with_name("cohort.csv")
    if sb.utils.distributed.if_main_process():
        table.groupby("spk_id").head(per_speaker).to_csv(path, index=False)
    sb.utils.distributed.ddp_barrier()
    return path


def train_loader_options(hparams, train) -> dict:
    """Dataloader options for the configured batch sampler (random, phrase or dynamic)."""
    options = dict(hparams["train_dataloader_options"])
    kind = hparams["batch_sampler"]
    if kind == "phrase":  # every batch holds one pass-phrase (the seed's "phrase-level batching")
        phrase_ids = [train.data[i]["phrase_id"] for i in train.data_ids]
        sampler = PhraseBatchSampler(phrase_ids, options.pop("batch_size"), seed=hparams["seed"])
        options.pop("shuffle", None)
        options["batch_sampler"] = sampler
    elif kind == "dynamic":
        options.pop("batch_size")
        options.pop("shuffle", None)
        options["batch_sampler"] = hparams["dynamic_batch_sampler"](train)
    elif kind != "random":
        raise ValueError(f"batch_sampler must be random, phrase or dynamic, not {kind!r}")
    if hparams["on_bad_audio"] == "skip":
        options["collate_fn"] = collate_readable
    elif hparams["on_bad_audio"] != "fail":
        raise ValueError(f"on_bad_audio must be fail or skip, not {hparams['on_bad_audio']!r}")
    return options


def build_brain(hparams, run_opts, n_classes: int, n_phrases: int, phrase_labels=None):
    """Complete the modules whose size depends on the data, and create the Brain.

    ``phrase_labels`` name the phrase classes (default: ``n_phrases`` numbered ones).
    """
    modules = dict(hparams["modules"])
    modules["classifier"] = hparams["classifier"](out_neurons=n_classes)
    modules["loss"] = hparams["loss"](n_classes=n_classes)
    if hparams["target_type"] == "speaker+phrase":
        modules["phrase_classifier"] = hparams["phrase_classifier"](out_neurons=n_phrases)
        modules["phrase_loss"] = hparams["phrase_loss"](n_classes=n_phrases)
    if hparams["phrase_branch"]:
        num_states = hparams["wavlm"].model.config.num_hidden_layers + 1
        modules["phrase_branch"] = hparams["phrase_branch_model"](
            num_states=num_states, n_phrases=n_phrases
        )
    checkpointer = hparams["checkpointer"]
    for name in ("classifier", "loss", "phrase_classifier", "phrase_loss", "phrase_branch"):
        if name in modules:
            checkpointer.add_recoverable(name, modules[name])
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


def prepare_data(hparams) -> None:
    """Synthesize the demo corpus if configured, then write the manifests (main process only)."""
    if hparams.get("synthetic_corpus"):
        folder = Path(hparams["data_folder"])
        if not folder.exists():  # a mistyped --data_folder would otherwise pass unnoticed
            logger.warning(
                "data_folder %s does not exist: synthesizing the demo corpus into it "
                "(synthetic_corpus: null to read a real corpus instead)",
                folder,
            )
        run_on_main(
            synthesize_corpus, kwargs={"out": hparams["data_folder"], **hparams["synthetic_corpus"]}
        )
    run_on_main(
        prepare_deepmine,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["prep_folder"],
            "dev_speakers": hparams["dev_speakers"],
            "seed": hparams["seed"],
            "include_free_text": hparams["include_free_text"],
            "skip_bad": hparams["skip_bad"],
        },
    )


def main(argv) -> None:
    """Prepare data, train, then evaluate the best checkpoint on the dev (and eval) trials."""
    hparams_file, run_opts, overrides, hparams = load_checked_hparams(argv)
    sb.utils.distributed.ddp_init_group(run_opts)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    prepare_data(hparams)
    data = dataio_prep(hparams)
    train, splits = data.train, data.splits
    brain = brain_for_data(hparams, run_opts, data)
    train_loader = brain.make_dataloader(
        train, stage=sb.Stage.TRAIN, **train_loader_options(hparams, train)
    )
    brain.use_data(len(train_loader), splits["dev"])
    brain.fit(
        brain.hparams.epoch_counter,
        train_loader,
        splits["dev"].utterances,
        valid_loader_kwargs=hparams["eval_dataloader_options"],
    )
    run_verification(brain, hparams, splits, data.cohort)


if __name__ == "__main__":
    main(sys.argv[1:])
