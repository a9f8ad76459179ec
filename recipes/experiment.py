"""An experiment's data and its trained embedding model, as every script uses them.

- Data: ``prepare_data`` (synthesize the demo corpus, write the manifests), ``dataio_prep``
  (datasets, label encoders, ``Split`` per evaluation split, the cohort) and the training
  loader's options.
- The model: ``assembled_model`` (the YAML's ``WavLMSpeakerEmbedder`` with its phrase branch,
  as training builds it), ``best_checkpoint`` and ``checkpoint_model`` (that model with a
  checkpoint's weights), so final scoring, ``verify_speakers.py``, ``export_model.py`` and the
  benchmarks need no Brain (``evaluation.verification.embed_tables`` runs it over a dataset).

Every step takes a small settings object (``CorpusSettings``, ``AudioSettings``,
``SamplingSettings``, ``ModelWiring``), never ``hparams``: the training YAML builds them from its
keys (``recipe_settings: !new:recipes.experiment.RecipeSettings``), so a key reaches its
consumer through the YAML alone, and every key is read (SpeechBrain's rule). No entry script
imports another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import speechbrain as sb
import torch
from speechbrain.dataio.dataio import read_audio
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.dataio.encoder import CategoricalEncoder
from speechbrain.utils.distributed import run_on_main
from speechbrain.utils.logger import get_logger

from data_prep.audio_checks import check_finite, check_waveform, file_problem
from data_prep.corpus import CORPORA, CORPUS_OPTIONS, FREE_TEXT_ID, SPLITS, preparer
from data_prep.manifests import official_lists
from data_prep.synth_deepmine import synthesize_corpus
from recipes.model.adaptation import WavLMTuning, adapt_wavlm
from recipes.model.speaker_model import WavLMSpeakerEmbedder
from recipes.model.trial_decisions import OTHER_PHRASE
from recipes.setting_rules import BOOLEAN, PATH, Choice, Range, rule
from recipes.training.augmentation import noise_reader
from recipes.training.checkpointing import MODEL_RECOVERABLE, CheckpointLoadError
from recipes.training.randomness import CROP, TrainingRandomness, crop_start
from recipes.training.sampling import PhraseBatchSampler, collate_readable, log_bad_audio

logger = get_logger(__name__)


def _random_batches(options: dict, sampling: SamplingSettings, train) -> dict:
    """SpeechBrain's shuffled batches of ``batch_size`` (the loader's own sampler)."""
    return options


def _phrase_batches(options: dict, sampling: SamplingSettings, train) -> dict:
    """Every batch holds one pass-phrase (the seed's "phrase-level batching")."""
    phrase_ids = [train.data[i]["phrase_id"] for i in train.data_ids]
    sampler = PhraseBatchSampler(phrase_ids, options.pop("batch_size"), seed=sampling.seed)
    options.pop("shuffle", None)
    return {**options, "batch_sampler": sampler}


#: ``batch_sampler``: the training loader's options for each choice (what the settings allow).
BATCH_SAMPLERS = {"random": _random_batches, "phrase": _phrase_batches}
#: ``on_bad_audio``: the collate function of each choice (None: SpeechBrain's, which fails).
BAD_AUDIO_ACTIONS = {"fail": None, "skip": collate_readable}
#: ``target_type``: what a training class is (``dataio_prep``'s labels).
TARGET_TYPES = ("speaker", "speaker_phrase")


# ------------------------------------------------------------------------------------------------
# The settings each step takes: the training YAMLs build them from their keys (``recipe_settings``,
# a ``RecipeSettings``), so the YAML is the one place that maps keys to code
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusSettings:
    """Where the corpus is and how data prep turns it into manifests (``prepare_data``)."""

    data_folder: str = field(metadata=rule(PATH))
    prep_folder: str = field(metadata=rule(PATH))
    corpus: str = field(metadata=rule(Choice(CORPORA)))  # its layout
    valid_speakers: int = field(metadata=rule(Range(1, integer=True)))  # held-out speakers
    seed: int = field(metadata=rule(Range(0, integer=True)))
    include_free_text: bool = field(metadata=rule(BOOLEAN))
    skip_bad: bool = field(metadata=rule(BOOLEAN))
    enrol_utts: int = field(metadata=rule(Range(0, integer=True)))  # 0: any number
    min_audio_seconds: float = field(metadata=rule(Range(0)))
    synthetic_corpus: dict | None  # data_prep/synth_deepmine.py options (checked there); None: real
    # corpus kaldi: a transcript seen fewer times in training is free text
    phrase_min_count: int = field(metadata=rule(Range(1, integer=True)))
    # corpus kaldi: wav.scp paths may lead out of data_folder
    audio_outside_data_folder: bool = field(metadata=rule(BOOLEAN))
    # per validation model; None: what the repetitions allow
    valid_enrol_utts: int | None = field(default=None, metadata=rule(Range(1, integer=True)))
    # corpus deepmine: keys of the official lists (optional)
    eval_key_file: str | None = field(default=None, metadata=rule(PATH))
    dev_key_file: str | None = field(default=None, metadata=rule(PATH))

    def preparer_options(self) -> dict:
        """The keyword arguments of the ``corpus`` preparer (``data_prep/corpus.py``)."""
        common = {
            "valid_speakers": self.valid_speakers,
            "seed": self.seed,
            "include_free_text": self.include_free_text,
            "skip_bad": self.skip_bad,
            "enrol_utts": self.enrol_utts,
            "min_seconds": self.min_audio_seconds,
            "valid_enrol_utts": self.valid_enrol_utts,
        }
        own = {
            "phrase_min_count": self.phrase_min_count,
            "audio_outside_data_folder": self.audio_outside_data_folder,
            "eval_key_file": self.eval_key_file,
            "dev_key_file": self.dev_key_file,
        }
        return {**common, **{key: own[key] for key in CORPUS_OPTIONS[self.corpus]}}


@dataclass(frozen=True)
class AudioSettings:
    """How utterances are read, labelled and checked (``dataio_prep``)."""

    sample_rate: int = field(metadata=rule(Range(1, integer=True)))
    crop_seconds: float = field(metadata=rule(Range(0, low_open=True)))  # training crops
    # the cap on a scored utterance
    max_eval_seconds: float = field(metadata=rule(Range(0, low_open=True)))
    min_audio_seconds: float
    on_bad_audio: str = field(metadata=rule(Choice(BAD_AUDIO_ACTIONS)))
    bad_audio_log: str = field(metadata=rule(PATH))
    target_type: str = field(metadata=rule(Choice(TARGET_TYPES)))
    cohort_utts_per_speaker: int = field(metadata=rule(Range(1, integer=True)))
    save_folder: str = field(metadata=rule(PATH))  # where the label encoders are kept


@dataclass(frozen=True)
class SamplingSettings:
    """How training batches are drawn (``train_loader_options``)."""

    batch_sampler: str = field(metadata=rule(Choice(BATCH_SAMPLERS)))
    loader_options: dict  # SpeechBrain's dataloader options (train_dataloader_options)
    seed: int
    on_bad_audio: str  # one of BAD_AUDIO_ACTIONS


@dataclass(frozen=True)
class ModelWiring:
    """How the YAML builds the model, and where the run's checkpoints are."""

    embedding_model: Callable  # phrase_branch -> WavLMSpeakerEmbedder (YAML: embedding_model)
    phrase_branch_model: Callable | None  # n_phrases -> PhraseBranch; None: no phrase branch
    checkpointer: object  # SpeechBrain's Checkpointer of the run
    tuning: WavLMTuning | None = None  # what of WavLM trains (LoRA adapters are part of the model)
    # the YAML's switch: False leaves phrase_branch_model out
    phrase_branch: bool = field(default=True, metadata=rule(BOOLEAN))

    def __post_init__(self):
        """A switched-off phrase branch is no branch (the YAML wires its builder regardless)."""
        if not self.phrase_branch:
            object.__setattr__(self, "phrase_branch_model", None)


class RecipeSettings(NamedTuple):
    """The settings of every step of a run: the training YAML's ``recipe_settings``.

    Training, scoring (``verify_speakers.py``) and the export read a run through it, never its
    keys one by one.
    """

    corpus: CorpusSettings
    audio: AudioSettings
    sampling: SamplingSettings
    scoring: object  # evaluation.verification.ScoringSettings (evaluation builds on this module)
    model: ModelWiring


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def prepare_data(corpus: CorpusSettings) -> None:
    """Synthesize the demo corpus if configured, then write the manifests (main process only).

    The manifests are the corpus contract's (``data_prep/corpus.py``), written by the preparer
    of the ``corpus`` setting.
    """
    if corpus.synthetic_corpus:
        folder = Path(corpus.data_folder)
        if not folder.exists():  # a mistyped --data_folder would otherwise pass unnoticed
            logger.warning(
                "data_folder %s does not exist: synthesizing the demo corpus into it "
                "(synthetic_corpus: null to read a real corpus instead)",
                folder,
            )
        run_on_main(
            synthesize_corpus, kwargs={"out": corpus.data_folder, **corpus.synthetic_corpus}
        )
    run_on_main(
        preparer(corpus.corpus),
        args=[corpus.data_folder, corpus.prep_folder],
        kwargs=corpus.preparer_options(),
    )


class Split(NamedTuple):
    """One evaluation split: its utterances (a dataset), enrollment models and trials.

    ``official``: for an official list pair, what its answer file is checked against
    (``data_prep.manifests.official_record``: the list, its trial count, the trials kept);
    None for the validation split.
    """

    utterances: DynamicItemDataset
    models: pd.DataFrame
    trials: pd.DataFrame
    official: dict | None = None


def _utterances(csv_paths, data_folder) -> DynamicItemDataset:
    """One dataset over the utterance manifests ``csv_paths``."""
    data = {}
    for path in csv_paths:
        data.update(
            sb.dataio.dataio.load_data_csv(path, replacements={"data_root": str(data_folder)})
        )
    return DynamicItemDataset(data)


def dataio_prep(corpus: CorpusSettings, audio: AudioSettings) -> RecipeData:
    """Datasets, label encoders and trial lists: what training and scoring read."""
    prep, rate = Path(corpus.prep_folder), audio.sample_rate
    crop = int(audio.crop_seconds * rate)
    max_eval = int(audio.max_eval_seconds * rate)

    skip_bad, bad_log = audio.on_bad_audio == "skip", audio.bad_audio_log
    randomness = TrainingRandomness(corpus.seed)  # its epoch is set by the training loop

    @sb.utils.data_pipeline.takes("id", "wav", "duration")
    @sb.utils.data_pipeline.provides("sig")
    def train_audio(utterance_id, wav, duration):
        """A random crop of ``crop_seconds`` (read from disk without loading the rest).

        The crop is keyed by the seed, the epoch and the utterance (``TrainingRandomness``): a
        resumed epoch crops as the uninterrupted one did, in whichever worker. A file that
        became unreadable after data prep (deleted, truncated) stops training with its name,
        or with ``on_bad_audio: skip`` is logged and left out of its batch (None).
        """
        frames = int(float(duration) * rate)
        start = crop_start(randomness.for_utterance(utterance_id, CROP), frames, crop)
        try:
            sig = read_audio({"file": wav, "start": start, "stop": start + crop})
            if sig.numel() == 0:
                raise ValueError(f"no samples from {start} (prepared duration {duration} s)")
            check_finite(sig, wav)  # one NaN would poison the weights
        except Exception as error:  # soundfile, torchaudio and our own errors alike
            if not skip_bad:
                raise RuntimeError(f"cannot read training audio {wav}: {error}") from error
            log_bad_audio(bad_log, wav, error)
            return None
        return sig

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def eval_audio(wav):
        """The whole utterance, capped at ``max_eval_seconds`` to bound memory.

        Checked as data prep checks it (the file may have changed since): a silent or
        non-finite file stops scoring with its name, never a score.
        """
        sig = read_audio({"file": wav, "start": 0, "stop": max_eval})
        return check_waveform(sig, rate, wav, audio.min_audio_seconds)

    target_type = audio.target_type  # one of TARGET_TYPES (checked at start-up)

    @sb.utils.data_pipeline.takes("spk_id", "phrase_id")
    @sb.utils.data_pipeline.provides("class_label", "phrase_label")
    def labels(spk_id, phrase_id):
        """The training class (speaker, or speaker x phrase) and the phrase."""
        phrase = OTHER_PHRASE if phrase_id == FREE_TEXT_ID else phrase_id  # free text: one class
        yield f"{spk_id}_{phrase}" if target_type == "speaker_phrase" else spk_id
        yield phrase

    train = _utterances([prep / "train.csv"], corpus.data_folder)
    train.add_dynamic_item(train_audio)
    train.add_dynamic_item(labels)
    class_encoder, phrase_encoder = CategoricalEncoder(), CategoricalEncoder()
    for encoder, name in ((class_encoder, "class"), (phrase_encoder, "phrase")):
        # DDP-safe: the main process creates the file, the others wait and load it.
        path = Path(audio.save_folder) / f"{name}_encoder.txt"
        encoder.load_or_create(path, from_didatasets=[train], output_key=f"{name}_label")
        encoder.ignore_len()  # the classifiers are sized from the encoders themselves
    train.add_dynamic_item(
        class_encoder.encode_label_torch, takes="class_label", provides="class_encoded"
    )
    train.add_dynamic_item(
        phrase_encoder.encode_label_torch, takes="phrase_label", provides="phrase_encoded"
    )
    train.set_output_keys(TRAIN_KEYS)

    def eval_utterances(csv_paths) -> DynamicItemDataset:
        """Whole utterances, longest first (less padding per batch)."""
        utts = _utterances(csv_paths, corpus.data_folder)
        utts.add_dynamic_item(eval_audio)
        utts.set_output_keys(["id", "sig"])
        return utts.filtered_sorted(sort_key="duration", reverse=True)

    splits, official = {}, official_lists(prep)
    for split in SPLITS:  # valid, then the official list pairs the corpus has
        if (prep / f"{split}_trials.csv").is_file():
            splits[split] = Split(
                eval_utterances([prep / f"{split}_enrol_utts.csv", prep / f"{split}_test.csv"]),
                pd.read_csv(prep / f"{split}_enrol.csv", dtype=str, keep_default_na=False),
                pd.read_csv(prep / f"{split}_trials.csv", dtype=str, keep_default_na=False),
                official.get(split),
            )

    def usable(wav: str) -> bool:
        """Whether a cohort file is still usable (``on_bad_audio: skip``; logged if not)."""
        path = wav.replace("$data_root", str(corpus.data_folder))
        reason = file_problem(path, rate, audio.min_audio_seconds).reason
        if reason:
            log_bad_audio(bad_log, path, reason)
        return reason is None

    cohort = _cohort_utterances(
        prep / "train.csv", audio.cohort_utts_per_speaker, usable if skip_bad else None
    )
    speakers = pd.read_csv(cohort, index_col="ID")["spk_id"]
    cohort = Cohort(eval_utterances([cohort]), speakers)
    return RecipeData(train, splits, cohort, class_encoder, phrase_encoder, randomness)


def check_phrase_classes(data: RecipeData, wiring: ModelWiring) -> None:
    """Refuse a phrase branch over fewer than two phrases (a text-independent corpus)."""
    labels = data.phrase_labels
    if len(labels) < 2 and wiring.phrase_branch_model is not None:
        raise SystemExit(
            "error: phrase_branch: True: a phrase classifier needs two phrases or more, but "
            f"the training data has one ({labels}): a text-independent corpus. Train it with "
            "phrase_branch: False, fusion: none (and target_type speaker)"
        )


#: What a training batch holds (``add_noise_crops`` adds ``noise``).
TRAIN_KEYS = ["id", "sig", "class_encoded", "phrase_encoded", "phrase_id"]


def add_noise_crops(
    data: RecipeData, noise_csv, corpus: CorpusSettings, audio: AudioSettings
) -> None:
    """Give each training utterance a crop of the noise list ``noise_csv``, read by the workers.

    For ``PrefetchedNoise`` (``add_noise``): the training script passes ``noise_csv`` only when
    noise augmentation is on. Only training calls this: scoring and export neither read the
    list nor check its files.
    """
    if not noise_csv:
        return
    prep, rate = Path(corpus.prep_folder), audio.sample_rate
    own_list = Path(noise_csv).resolve() == (prep / "train_noise.csv").resolve()
    crop = int(audio.crop_seconds * rate)
    reader = noise_reader(noise_csv, corpus.data_folder, rate, crop, not own_list, data.randomness)
    data.train.add_dynamic_item(reader)
    data.train.set_output_keys([*TRAIN_KEYS, "noise"])


class Cohort(NamedTuple):
    """Score normalization's cohort: training utterances and the speaker of each."""

    utterances: DynamicItemDataset
    speakers: pd.Series  # speaker per utterance id


class RecipeData(NamedTuple):
    """What ``dataio_prep`` makes: datasets, ``Split`` per split, cohort, label encoders."""

    train: DynamicItemDataset
    splits: dict[str, Split]
    cohort: Cohort
    class_encoder: CategoricalEncoder
    phrase_encoder: CategoricalEncoder
    randomness: TrainingRandomness  # of the training crops (the epoch set by training)

    @property
    def phrase_labels(self) -> list[str]:
        """The phrase classes in the classifier's output order."""
        return [self.phrase_encoder.ind2lab[i] for i in range(len(self.phrase_encoder))]


def _cohort_utterances(train_csv: Path, per_speaker: int, usable=None) -> Path:
    """A manifest of the first ``per_speaker`` training utterances of each speaker (by id).

    ``usable(wav)`` (with ``on_bad_audio: skip``) passes over files that became unusable since
    data prep, as training leaves them out: the speaker's next utterances take their place.
    """
    table = pd.read_csv(train_csv, dtype=str, keep_default_na=False).sort_values("ID")
    path = train_csv.with_name("cohort.csv")
    if sb.utils.distributed.if_main_process():
        if usable is None:
            chosen = table.groupby("spk_id").head(per_speaker)
        else:  # checked one by one: only as many files as the cohort takes are read
            chosen = pd.concat(
                group[_first_usable(group["wav"], per_speaker, usable)]
                for _, group in table.groupby("spk_id", sort=False)
            )
        chosen.to_csv(path, index=False)
    sb.utils.distributed.ddp_barrier()
    return path


def _first_usable(wavs: pd.Series, count: int, usable) -> list[bool]:
    """A mask of the first ``count`` of ``wavs`` that are ``usable`` (the rest are not read)."""
    mask, found = [], 0
    for wav in wavs:
        keep = found < count and usable(wav)
        found += keep
        mask.append(keep)
    return mask


def train_loader_options(sampling: SamplingSettings, train) -> dict:
    """Dataloader options for the configured batch sampler (``BATCH_SAMPLERS``) and bad audio."""
    options = BATCH_SAMPLERS[sampling.batch_sampler](dict(sampling.loader_options), sampling, train)
    collate = BAD_AUDIO_ACTIONS[sampling.on_bad_audio]
    return options if collate is None else {**options, "collate_fn": collate}


# ------------------------------------------------------------------------------------------------
# The trained model
# ------------------------------------------------------------------------------------------------
def best_checkpoint(checkpointer):
    """The checkpoint with the lowest validation EER; a clear error when the folder has none."""
    checkpoint = checkpointer.find_checkpoint(min_key="EER")
    if checkpoint is None:
        raise FileNotFoundError(
            f"no checkpoint with a validation EER in {checkpointer.checkpoints_dir}: "
            "train first (recipes/train_speaker_embeddings.py) or point --output_folder at a run"
        )
    return checkpoint


def assembled_model(wiring: ModelWiring, n_phrases: int) -> WavLMSpeakerEmbedder:
    """The YAML's ``embedding_model``, with a phrase branch over ``n_phrases`` when configured.

    Training builds its model here, and so does loading a checkpoint: one model, one assembly.
    ``wiring.tuning`` freezes WavLM or inserts its LoRA adapters (``adaptation.adapt_wavlm``).
    """
    branch = None
    if wiring.phrase_branch_model is not None:
        branch = wiring.phrase_branch_model(n_phrases=n_phrases)
    model = wiring.embedding_model(phrase_branch=branch)
    adapt_wavlm(model.encoder.model, wiring.tuning)
    return model


def data_free_model(wiring: ModelWiring) -> WavLMSpeakerEmbedder:
    """``assembled_model`` without the phrase branch: the part of the model the data does not size.

    It shares the YAML's WavLM and head with the model training builds later.
    """
    return assembled_model(replace(wiring, phrase_branch_model=None), 0)


def checkpoint_state(checkpoint, name: str) -> dict:
    """One recoverable's state dict from a checkpoint folder (tensors only: no code runs)."""
    try:
        return torch.load(checkpoint.path / f"{name}.ckpt", map_location="cpu", weights_only=True)
    except Exception as error:  # torch's message does not name the file
        raise CheckpointLoadError(checkpoint.path, error) from error


def checkpoint_model(wiring: ModelWiring, checkpoint, n_phrases: int) -> WavLMSpeakerEmbedder:
    """The embedding model of ``checkpoint`` (``assembled_model`` with its weights; eval)."""
    model = assembled_model(wiring, n_phrases)
    model.load_state_dict(checkpoint_state(checkpoint, MODEL_RECOVERABLE), strict=True)
    return model.eval()


def run_device(run_opts: dict) -> torch.device:
    """The device of this process: ``run_opts["device"]``, per local rank under torchrun."""
    device = run_opts.get("device") or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(device)


PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: ``precision`` / ``eval_precision``: fp32, or autocast to one of ``PRECISIONS``.
PRECISION_CHOICES = ("fp32", *PRECISIONS)


def native_bf16() -> bool:
    """Whether the GPU computes bf16 itself (``is_bf16_supported()`` is also True for emulation)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def usable_precision(precision: str, device) -> str:
    """``precision`` where ``device`` runs it as autocast; else fp32, with a log line.

    A run trained on a GPU in fp16 and rescored or exported on a CPU would otherwise run fp16
    CPU autocast: slow, and refused by SpeechBrain's own Brain. A GPU without bf16 likewise.
    """
    device = torch.device(device)
    if precision == "fp16" and device.type == "cpu":
        reason = "the CPU has no fast fp16 autocast (SpeechBrain refuses it there)"
    elif precision == "bf16" and device.type == "cuda" and not native_bf16():
        reason = "this GPU has no bf16 (before Ampere, torch only emulates it, slowly)"
    else:
        return precision
    logger.warning("eval_precision %s on %s: %s; evaluating in fp32", precision, device, reason)
    return "fp32"
