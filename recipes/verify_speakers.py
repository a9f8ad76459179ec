#!/usr/bin/env python3
"""Speaker verification: score a recipe's trials (``trials``), or audio files (``files``).

Trials of a training run (SdSV / TdSV protocol, reports per condition):

    python recipes/verify_speakers.py trials hparams/verification.yaml \
        --output_folder results/synthetic_demo/1986
    python recipes/verify_speakers.py trials hparams/verification.yaml \
        --output_folder results/wavlm_td/1986 --score_norm as-norm
    python recipes/verify_speakers.py hparams/verification.yaml ...   # the same: "trials"

reads the run's record (``<output_folder>/hyperparams.yaml``: data, model, scoring), with the
settings of ``hparams/verification.yaml`` that are not null in place of the run's; uses its best
checkpoint, embeds every utterance once (cached under ``embeddings/<checkpoint>/``) and writes,
per split (``valid``, ``eval``, TdSV 2024's ``dev``): ``scores_<split>.txt``,
``verification_<split>.json``, ``det_<split>.png``, and for each official list the challenge's
answer file (``answer.txt`` for eval, ``answer_dev.txt``: one score per line in the trial list's
order) and ``submission_<split>.zip`` holding it as ``answer.txt``. With
``--model DIR`` (an exported folder or a Hugging Face ``*ForXVector`` directory) it scores that
model on the same trials instead, writing under ``<output_folder>/models/<name>/``: other models
compared on our protocol (``--run_hparams hparams/wavlm_td.yaml`` then needs no training run).

Audio files with a trained model (any sample rate and channel count; resampled / down-mixed):

    python recipes/verify_speakers.py files --model results/.../export \
        --enrol e1.wav e2.wav e3.wav --test t1.wav t2.wav
    python recipes/verify_speakers.py files --model results/.../export --pairs pairs.txt
    python recipes/verify_speakers.py files --model results/.../export --backend onnx ...

A pairs file has one trial a line, ``[label] enrol test``: ``enrol`` may list several files
joined by commas, the optional label is 1/0 or target/nontarget (then EER and minDCF are
printed), and relative paths are taken from ``--audio_root`` (default: the current folder).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import shlex
import sys
from functools import partial
from pathlib import Path
from typing import NamedTuple

import soundfile as sf
import torch
from speechbrain.dataio.preprocess import AudioNormalizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.audio_checks import declared_wav_frames, waveform_problem
from data_prep.manifests import read_utf8
from recipes.evaluation.metrics import verification_metrics
from recipes.evaluation.pretrained import embed_dataset, load_verifier
from recipes.evaluation.verification import (
    FusionSource,
    check_splits,
    embedding_cache,
    run_verification,
    score_splits,
)
from recipes.experiment import best_checkpoint, dataio_prep, prepare_data
from recipes.model.onnx_verifier import ONNX_INT8_MODEL, ONNX_MODEL, OnnxVerifier
from recipes.model.trial_decisions import SDSV_COSTS, bayes_threshold, cosine
from recipes.settings import load_run, load_step

LABELS = {"1": True, "target": True, "0": False, "nontarget": False}


# ------------------------------------------------------------------------------------------------
# Trials of a recipe
# ------------------------------------------------------------------------------------------------
def scoring_replacements(verification: dict) -> dict:
    """The run's settings that ``hparams/verification.yaml`` replaces (None: the run's own).

    The output folder is the run's (where an experiment YAML names the run: the reports').
    """
    return {
        "output_folder": verification["output_folder"],
        "data_folder": verification["data_folder"],
        "eval_key_file": verification["eval_key_file"],
        "dev_key_file": verification["dev_key_file"],
        "score_norm": verification["score_norm"],
        "cohort_top_k": verification["cohort_top_k"],
        "fusion": verification["fusion"],
        "fusion_prior": verification["fusion_prior"],
        "fusion_quality": verification["fusion_quality"],
        "eval_precision": verification["eval_precision"],
    }


def verify_recipe(argv, model=None, trust_model_code=False) -> None:
    """Score a run's trials with its best checkpoint, or with the model folder ``model``.

    ``argv``: ``hparams/verification.yaml`` and SpeechBrain's options / overrides of its keys
    (``--output_folder`` names the run). ``trust_model_code``: load ``model`` by running its
    own code (``pretrained.load_verifier``).
    """
    run_opts, verification = load_step(argv)
    hparams = load_run(verification["run_hparams"], scoring_replacements(verification), run_opts)
    settings = hparams["recipe_settings"]
    scoring = settings.scoring
    if model is None:
        best_checkpoint(settings.model.checkpointer)  # a clear error now, not after data prep
    else:  # a folder that cannot load is named now, not after data prep
        device = {"device": run_opts.get("device", "cpu")}
        verifier = load_verifier(model, device, trust_model_code=trust_model_code)
    prepare_data(settings.corpus)
    data = dataio_prep(settings.corpus, settings.audio)
    if model is None:
        run_verification(scoring, settings.model, data, run_opts)
        return
    check_splits(data.splits)
    if scoring.fusion != "none" and not getattr(verifier.hparams, "phrase_labels", None):
        raise SystemExit(
            f"error: fusion: {scoring.fusion!r} needs a model with a phrase branch, and "
            f"{model} has none: add --fusion none to score its speaker embeddings"
        )
    name = model_name(model)
    folder = Path(scoring.output_folder) / "models" / name
    embed = partial(
        embed_dataset,
        verifier,
        loader_kwargs=scoring.loader_options,
        progress=not run_opts.get("noprogressbar"),
    )
    fusion = FusionSource(
        folder / "fusion.json",
        getattr(verifier.hparams, "phrase_labels", None),
        {"model": name},
    )
    cache = embedding_cache(folder / "embeddings", scoring.embedding_record())
    results = score_splits(embed, scoring, data.splits, data.cohort, cache, folder, fusion)
    for split, metrics in results.items():
        if "pooled" in metrics:
            pooled = metrics["pooled"]
            print(f"{split}: EER {pooled['eer']:.2f} %, minDCF {pooled['min_dcf']:.4f}")
    print(f"reports in {folder}")


def model_name(model) -> str:
    """A folder name for a scored model: its path's last parts and a hash of its files.

    The hash (names, sizes, modification times) keeps the embedding cache of a re-exported or
    replaced model apart from the old one.
    """
    path = Path(model).resolve()
    stamp = hashlib.sha1()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        info = file.stat()
        stamp.update(f"{file.relative_to(path)} {info.st_size} {info.st_mtime_ns}\n".encode())
    return f"{'_'.join(path.parts[-2:])}_{stamp.hexdigest()[:8]}"


# ------------------------------------------------------------------------------------------------
# Audio files
# ------------------------------------------------------------------------------------------------
class PairsFileError(ValueError):
    """A pairs file line that cannot be used (named by file and line)."""


class Pair(NamedTuple):
    """One trial of a pairs file."""

    label: bool | None
    enrol: list[Path]
    test: Path
    text: str  # "enrol test" as written in the file


def read_pairs(path: Path, audio_root: Path) -> list[Pair]:
    """The trials of a pairs file; every problem (file:line) reported at once."""
    pairs, problems = [], []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            fields = shlex.split(line, comments=True)  # "quoted paths/with spaces.wav"
        except ValueError as error:
            problems.append(f"{where}: {error} in {line.strip()!r}")
            continue
        if not fields:
            continue
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[0] not in LABELS):
            problems.append(f"{where}: expected '[label] enrol test', got {line.strip()!r}")
            continue
        label = LABELS[fields[0]] if len(fields) == 3 else None
        enrol = [audio_root / name for name in fields[-2].split(",") if name]
        test = audio_root / fields[-1]
        problems += [f"{where}: no such file {f}" for f in [*enrol, test] if not f.is_file()]
        pairs.append(Pair(label, enrol, test, f"{fields[-2]} {fields[-1]}"))
    if {pair.label is None for pair in pairs} == {True, False}:
        problems.append(f"{path}: label every line or none")
    if problems:
        raise PairsFileError(capped(problems))
    if not pairs:
        raise PairsFileError(f"{path}: no trials")
    return pairs


#: The most problems printed one by one; the rest are counted.
MAX_PROBLEMS_SHOWN = 20


def capped(problems: list[str], limit: int = MAX_PROBLEMS_SHOWN) -> str:
    """The problems one per line, the first ``limit`` of them, and a count of the rest."""
    shown = problems[:limit]
    if len(problems) > limit:
        shown.append(f"... and {len(problems) - limit} more problem(s)")
    return "\n".join(shown)


class EmbeddingCache:
    """Each audio file embedded once, however many trials use it."""

    def __init__(self, verifier):
        self.verifier, self.outputs = verifier, {}

    def __call__(self, path: Path) -> dict:
        """The model's outputs for ``path`` (speaker embedding, phrase outputs)."""
        if path not in self.outputs:
            self.outputs[path] = self.verifier.embed_file_all(path)
        return self.outputs[path]

    def verdict(self, enrol: list[Path], test: Path, args, replay: bool = False):
        """The ``Verdict`` of a test file against its enrollment files.

        A replay (the test's samples are an enrollment file's, ``replay``, or its speaker
        embedding is practically one's) is rejected, unless ``--allow_replay``.
        """
        costs = {"p_target": args.p_target, "c_miss": args.c_miss, "c_fa": args.c_fa}
        enrolled, tested = [self(p) for p in enrol], self(test)
        verdict = self.verifier.score_trial(enrolled, tested, args.phrase, args.threshold, costs)
        replay = replay or any(same_embedding(e, tested) for e in enrolled)
        if replay and not args.allow_replay:
            return verdict._replace(accept=False, reason=REPLAY)
        return verdict


#: A test whose speaker embedding has at least this cosine with an enrollment file's is that
#: file again (two recordings of a voice are far apart at this precision).
REPLAY_COSINE = 0.9999
#: The reason a replayed enrollment file is rejected.
REPLAY = "replay of an enrollment file"


def same_embedding(a: dict, b: dict) -> bool:
    """Whether two files' speaker embeddings are practically identical (``REPLAY_COSINE``)."""
    return cosine(a["speaker"], b["speaker"]) >= REPLAY_COSINE


def verdict_text(verdict) -> str:
    """Speaker score, [phrase score, LLR,] decision [and the reason of a reject]."""
    fields = [f"{verdict.speaker_score:.6f}"]
    if verdict.phrase_score is not None:
        fields += [f"{verdict.phrase_score:.6f}", f"{verdict.score:.6f}"]
    if verdict.accept is None:
        fields.append("-")
    else:
        fields.append("accept" if verdict.accept else "reject")
    if verdict.reason in ("wrong pass-phrase", REPLAY):
        fields.append(f"({verdict.reason})")
    fields += [f"({note})" for note in verdict.notes]
    return " ".join(fields)


def decision_note(verifier, n_enrol: int, args) -> str:
    """What the decisions are taken on, and at which threshold."""
    if verifier.has_fusion():
        if args.threshold is not None:
            return f"LLR threshold {args.threshold:.4f} (given)"
        threshold = bayes_threshold(args.p_target, args.c_miss, args.c_fa)
        return (
            f"columns: speaker score, phrase score, LLR, decision; LLR threshold {threshold:.4f} "
            f"(Bayes: p_target {args.p_target}, c_miss {args.c_miss}, c_fa {args.c_fa})"
        )
    if args.threshold is not None:
        return f"threshold {args.threshold:.4f} (given)"
    calibrated = verifier.threshold(n_enrol)
    if calibrated is None:
        return "no calibrated threshold in this model: scores only (use --threshold)"
    point, count = verifier.hparams.operating_point, verifier.calibrated_count(n_enrol)
    nearest = "" if count == n_enrol else f", the nearest calibrated count to {n_enrol}"
    return (
        f"threshold {calibrated:.4f} (validation {point} point, {count}-utterance "
        f"enrollment{nearest})"
    )


def unusable_audio(paths, digests: dict | None = None) -> list[str]:
    """``"path: reason"`` for each file that cannot be scored (checked before a model loads).

    The checks of data prep (``audio_checks.waveform_problem``) at the file's own sample rate,
    channels averaged; the model's loader checks again after resampling. ``digests`` (if given)
    gets a hash of each readable file's samples and rate: the same recording however named.
    """
    problems = []
    for path in dict.fromkeys(paths):
        try:
            samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as error:
            problems.append(f"{path}: unreadable audio ({str(error).strip()})")
            continue
        if digests is not None:
            digests[path] = hashlib.sha1(samples.tobytes() + str(rate).encode()).hexdigest()
        declared = declared_wav_frames(path)
        reason = waveform_problem(samples.mean(axis=1), rate)
        if declared is not None and declared > len(samples):
            reason = (
                f"truncated: the header declares {declared} samples, the file holds {len(samples)}"
            )
        if reason:
            problems.append(f"{path}: {reason}")
    return problems


def repeated_enrollment(pairs: list[Pair], digests: dict) -> list[str]:
    """A problem for each enrollment that lists one recording twice (by path or by samples).

    Three copies of one file are no 3-utterance model: its threshold would be calibrated for
    three different recordings.
    """
    problems = []
    for pair in pairs:
        seen = {}
        for path in pair.enrol:
            key = digests.get(path, Path(path).resolve())
            if key in seen:
                problems.append(f"the enrollment repeats a recording: {path} is {seen[key]}")
            seen.setdefault(key, path)
    return list(dict.fromkeys(problems))


#: The ``--backend`` choices: the SpeechBrain folder, or one of its ONNX models (its file).
BACKENDS = {"pytorch": None, "onnx": ONNX_MODEL, "onnx-int8": ONNX_INT8_MODEL}


def load_backend(args):
    """The verifier of ``args.model`` that ``--backend`` names.

    The ONNX backends resample files at another rate as the PyTorch one does (SpeechBrain's
    ``AudioNormalizer``); a torch-free user resamples beforehand (``OnnxVerifier``).
    """
    if BACKENDS[args.backend] is None:
        return load_verifier(args.model, {"device": args.device}, args.trust_model_code)
    verifier = OnnxVerifier(args.model, BACKENDS[args.backend])  # its decision data checked
    normalizer = AudioNormalizer(verifier.hparams.sample_rate)

    def resample(samples, rate):
        """Mono ``samples`` at the model's rate, as the PyTorch backend reads them."""
        return normalizer(torch.from_numpy(samples), rate).numpy()

    verifier.resampler = resample
    return verifier


def verify_files(args) -> None:
    """Score test files against an enrollment, or every line of a pairs file."""
    if args.pairs:
        pairs = read_pairs(Path(args.pairs), Path(args.audio_root))
    else:
        missing = [p for p in [*args.enrol, *args.test] if not Path(p).is_file()]
        if missing:
            raise SystemExit(f"no such file: {', '.join(missing)}")
        pairs = [Pair(None, [Path(p) for p in args.enrol], Path(t), t) for t in args.test]
    if args.out:
        check_output(Path(args.out), pairs, args)
    digests = {}
    problems = unusable_audio(
        (path for pair in pairs for path in [*pair.enrol, pair.test]), digests
    )
    problems += repeated_enrollment(pairs, digests)
    if problems:
        raise SystemExit("refused, nothing scored:\n" + capped(problems))
    verifier = load_backend(args)
    if args.operating_point:
        verifier.hparams.operating_point = args.operating_point
    cache = EmbeddingCache(verifier)
    if not args.pairs:
        note = decision_note(verifier, len(args.enrol), args)
        print(f"enrollment: {len(args.enrol)} file(s); {note}")
    lines, scores = [], []
    for pair in pairs:
        replay = digests.get(pair.test) in {digests.get(p) for p in pair.enrol}
        verdict = cache.verdict(pair.enrol, pair.test, args, replay)
        scores.append(verdict.score)
        lines.append(f"{pair.text} {verdict_text(verdict)}")
    output = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(output)
        print(f"{len(lines)} scores written to {args.out}")
    else:
        sys.stdout.write(output)
    labels = [pair.label for pair in pairs]
    if labels[0] is not None:
        metrics = verification_metrics(scores, labels)
        print(
            f"EER {metrics['eer']:.2f} % (threshold {metrics['eer_threshold']:.4f}), "
            f"minDCF {metrics['min_dcf']:.4f} ({metrics['targets']} targets, "
            f"{metrics['nontargets']} non-targets)"
        )


def check_output(out: Path, pairs, args) -> None:
    """Refuse an ``--out`` that would replace an input: audio, the pairs file, the model folder.

    Any existing audio file is refused too (``soundfile`` reads it): scores never replace a
    recording, named or not.
    """
    target = out.resolve()
    inputs = {path.resolve() for pair in pairs for path in [*pair.enrol, pair.test]}
    if args.pairs:
        inputs.add(Path(args.pairs).resolve())
    model = Path(args.model).resolve()
    if target in inputs or model == target or model in target.parents:
        raise SystemExit(f"error: --out {out} is an input of this run: give another file")
    if target.is_file():
        try:
            sf.info(str(target))
        except RuntimeError:  # soundfile's errors are RuntimeErrors
            return  # not audio: an earlier scores file, replaced
        raise SystemExit(f"error: --out {out} is an audio file: scores never replace a recording")


def parse_arguments(argv) -> argparse.Namespace:
    """The ``trials`` or ``files`` command and its arguments.

    An hparams file as the first argument means ``trials``: ``verify_speakers.py HPARAMS ...``,
    the way SpeechBrain runs a recipe's scripts (``tests/recipes/DeepMine.csv``).
    """
    if argv and str(argv[0]).endswith((".yaml", ".yml")):
        argv = ["trials", *argv]
    parser = argparse.ArgumentParser(
        description="Speaker verification: score a recipe's trials, or audio files."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    trials = commands.add_parser(
        "trials",
        help="score a recipe's validation and official trials (reports per condition)",
        description="Score a training run's trials with its best checkpoint or another model. "
        "Other options are SpeechBrain's and overrides of hparams/verification.yaml "
        "(--output_folder DIR, --score_norm as-norm, ...).",
    )
    trials.add_argument("hparams", help="the scoring step's hparams: hparams/verification.yaml")
    trials.add_argument(
        "--model", help="score this exported folder or HF *ForXVector directory instead"
    )
    trials.add_argument("--trust_model_code", action="store_true", help=TRUST_HELP)
    files = commands.add_parser(
        "files",
        help="verify speakers in audio files with a trained model",
        description="Verify speakers in audio files with a trained model.",
    )
    add_file_arguments(files)
    args, rest = parser.parse_known_args(argv)
    if args.command == "trials":
        args.recipe_argv = [args.hparams, *rest]
        return args
    if rest:
        files.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.enrol and not args.test:
        files.error("--enrol needs --test")
    if args.pairs and args.test:
        files.error("--test goes with --enrol; a --pairs file names its own test files")
    if args.threshold is not None and not math.isfinite(args.threshold):
        files.error(f"--threshold must be a finite number, not {args.threshold}")
    if args.out:
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            files.error(f"--out {out}: not a writable file path (checked before scoring)")
    costs_finite = math.isfinite(args.c_miss) and math.isfinite(args.c_fa)
    if not 0 < args.p_target < 1 or not costs_finite or args.c_miss <= 0 or args.c_fa <= 0:
        files.error("--p_target must be in (0, 1), --c_miss and --c_fa finite and positive")
    return args


def add_file_arguments(parser) -> None:
    """Arguments of the ``files`` command."""
    parser.add_argument("--model", required=True, help="exported folder or HF *ForXVector dir")
    parser.add_argument(
        "--backend", choices=tuple(BACKENDS), default="pytorch",
        help="run the exported folder's PyTorch model, or its ONNX model (fp32 or int8) with "
        "onnxruntime: the same decisions from the same thresholds and fusion",
    )  # fmt: skip
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--enrol", nargs="+", help="enrollment audio file(s)")
    group.add_argument("--pairs", help="trial list: '[label] enrol[,enrol...] test' per line")
    parser.add_argument("--test", nargs="+", help="test audio file(s) (with --enrol)")
    parser.add_argument("--audio_root", default=".", help="base of relative paths in --pairs")
    parser.add_argument(
        "--threshold", type=float, help="decision threshold (default: validation-calibrated)"
    )
    parser.add_argument(
        "--operating_point", choices=("eer", "min_dcf"), help="calibrated threshold to use"
    )
    parser.add_argument(
        "--phrase",
        help="the enrolled pass-phrase id (e.g. 01); 'custom' for a phrase the model was not "
        "trained on (content similarity); default: recognized from the enrollment audio",
    )
    for name, default, text in (
        ("--p_target", SDSV_COSTS["p_target"], "prior of a target trial"),
        ("--c_miss", SDSV_COSTS["c_miss"], "cost of a miss"),
        ("--c_fa", SDSV_COSTS["c_fa"], "cost of a false alarm"),
    ):
        parser.add_argument(name, type=float, default=default, help=f"{text} (Bayes threshold)")
    parser.add_argument("--out", help="write the scores here instead of printing them")
    parser.add_argument(
        "--allow_replay", action="store_true",
        help="score a test that is an enrollment file again (rejected as a replay by default)",
    )  # fmt: skip
    parser.add_argument("--trust_model_code", action="store_true", help=TRUST_HELP)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


#: ``--trust_model_code``: by default a model folder is read as data and nothing of it runs.
TRUST_HELP = (
    "load an exported folder the way SpeechBrain's foreign_class does, running its "
    "hyperparams.yaml and tdsv_speaker_model.py: only for a folder from a source you trust "
    "(default: read as data; nothing in the folder runs)"
)


def main(argv) -> None:
    """Run the ``trials`` or the ``files`` command."""
    args = parse_arguments(argv)
    if args.command == "trials":
        verify_recipe(args.recipe_argv, args.model, args.trust_model_code)
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # says what it resampled
    os.environ["SB_LOG_LEVEL"] = "WARNING"  # SpeechBrain loggers made from now on
    for name in list(logging.root.manager.loggerDict):  # not which files SpeechBrain fetched
        if name.startswith("speechbrain"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        verify_files(args)
    except (PairsFileError, FileNotFoundError, RuntimeError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main(sys.argv[1:])
