"""Start-up checks of a recipe's settings: every bad value is named at once, before anything runs.

A mistyped choice (``--score_norm asnorm``) or an impossible combination (a fusion without a
phrase branch) would otherwise surface only when the code that reads it runs, possibly after
hours of training. ``load_checked_hparams`` (the training script) checks the settings on the
YAML text with the command line's overrides applied, before HyperPyYAML builds any object
(WavLM would be downloaded or built), then loads it. ``load_step`` and ``load_run`` do the same
for a step on a trained run (scoring, export): its own small YAML, then the run's record with
the settings the step replaces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import ruamel.yaml
import torch
from hyperpyyaml.core import resolve_references
from ruamel.yaml.constructor import DuplicateKeyError, SafeConstructor

from data_prep import synth_deepmine
from recipes import experiment
from recipes.evaluation.verification import ScoringSettings
from recipes.experiment_lock import hold_experiment_lock
from recipes.model import adaptation, modules, speaker_model, trial_decisions
from recipes.setting_rules import BOOLEAN, PATH, Choice, ListOf, Range, declared_rules
from recipes.training.resume_guard import WIRING

#: The rules the settings objects declare beside their fields (``recipes/setting_rules.py``).
DECLARED = declared_rules(
    experiment.CorpusSettings, experiment.AudioSettings, experiment.SamplingSettings,
    experiment.ModelWiring, ScoringSettings,
)  # fmt: skip

_SWITCHES = (
    "skip_nonfinite_grads", "freeze_cnn", "gradient_checkpointing", "augment", "aug_noise",
    "aug_speed", "aug_drop_freq", "aug_drop_chunk", "use_tensorboard", "export_onnx",
    "export_int8_metrics",
)  # fmt: skip
_COUNTS = (
    "number_of_epochs", "batch_size", "grad_accumulation_factor", "total_steps", "emb_dim",
    "ckpt_num_to_keep", "lora_rank", "export_check_trials",
)  # fmt: skip
_COUNTS_FROM_0 = ("nonfinite_patience", "freeze_wavlm_epochs", "warmup_steps", "num_workers")
#: ``margin`` must also be below its type's ``MARGIN_LIMITS``.
_NON_NEGATIVE = (
    "ckpt_interval_minutes", "weight_decay", "l2sp_weight", "phrase_loss_weight",
    "margin_warmup_epochs", "margin",
)  # fmt: skip
#: ``scale``: 0 multiplies every logit away, and nothing trains.
_POSITIVE = ("lora_alpha", "max_grad_norm", "lr_wavlm", "lr_head", "scale")
#: ``noise_csv`` may be null: no noise list.
_PATHS = ("train_log", "noise_csv", "run_hparams", "export_folder", "init_from")
#: The rules of the keys no settings object holds: training's (the YAML wires them into
#: SpeechBrain's and the model's objects), the export's, and ``WavLMTuning``'s (its fields have
#: other names). Registries are the dispatching code's own, read when checking.
OWN_RULES = {
    "margin_type": Choice(modules.MARGIN_TYPES),
    "scale_mode": Choice(modules.SCALE_MODES),
    "precision": Choice(experiment.PRECISION_CHOICES),
    "export_operating_point": Choice(trial_decisions.OPERATING_POINTS),
    "wavlm_attention": Choice(speaker_model.ATTENTION_KINDS),
    "wavlm_tuning": Choice(adaptation.TUNING_MODES),
    "lora_targets": ListOf(adaptation.LORA_TARGETS),
    **dict.fromkeys(_SWITCHES, BOOLEAN),
    **dict.fromkeys(_COUNTS, Range(1, integer=True)),
    **dict.fromkeys(_COUNTS_FROM_0, Range(0, integer=True)),
    **dict.fromkeys(_NON_NEGATIVE, Range(0)),
    **dict.fromkeys(_POSITIVE, Range(0, low_open=True)),
    "lr_decay_factor": Range(0, 1, low_open=True),
    "max_data_wait_share": Range(0, 1),
    # A cosine classifier's additive margin: at 1 or more, a target at cosine 1 can no longer
    # beat an impostor class at cosine 0, and the loss cannot fall (it rises).
    "phrase_margin": Range(0, 1, high_open=True),
    **dict.fromkeys(_PATHS, PATH),
}
if set(OWN_RULES) & set(DECLARED):
    raise ValueError(f"rules declared twice: {sorted(set(OWN_RULES) & set(DECLARED))}")
#: Every key's rule (``total_steps`` may also be null: derived from the data).
RULES = {**OWN_RULES, **DECLARED}
#: The numeric settings' ranges.
RANGES = {key: check for key, check in RULES.items() if isinstance(check, Range)}


def choices(hparams) -> dict[str, tuple]:
    """Every enumerated setting and its allowed values, from the code's own registries.

    ``head_type`` is checked against the YAML's own ``heads``.
    """
    allowed = {key: tuple(check.registry) for key, check in RULES.items() if type(check) is Choice}
    if isinstance(hparams.get("heads"), dict):  # the heads the YAML wires (build_choice)
        allowed["head_type"] = tuple(hparams["heads"])
    return allowed


#: WavLM's CNN needs this many samples for one frame (its receptive field, 25 ms at 16 kHz: every
#: released WavLM has the same CNN); a shorter crop or utterance fails inside the model.
WAVLM_RECEPTIVE_FIELD = 400

#: The margin below which each margin type can still separate classes: AM subtracts it from the
#: cosine (< 1, as above), AAM adds it to the angle (< pi/2: cos(theta + m) must stay above 0).
MARGIN_LIMITS = {"am": 1.0, "aam": math.pi / 2}

#: Settings read as they are, with why. A key of a YAML that has no rule and is not here fails
#: ``tests/test_settings.py``: every setting is checked or said to be free.
FREE = {
    **{key: "a path" for key, check in RULES.items() if check is PATH},
    **dict.fromkeys(WIRING, "wiring: an object HyperPyYAML builds"),
    "experiment": "the experiment's name (part of output_folder)",
    "wavlm_source": "a Hugging Face id or a local directory (resolved when the YAML is built)",
    "synthetic_corpus": "data_prep/synth_deepmine.py options (checked there), or null",
}


def settings_problems(hparams) -> list[str]:
    """One line per bad setting (empty when all are usable)."""
    problems = []
    for key, allowed in choices(hparams).items():
        if key in hparams and hparams[key] not in allowed:
            shown = ", ".join(map(str, allowed))
            problems.append(f"{key}: {hparams[key]!r} is not one of {shown}")
    for key, check in RULES.items():
        value = hparams.get(key)
        if key not in hparams or (value is None and check is not BOOLEAN):
            continue
        if isinstance(check, ListOf) and not distinct_of(value, tuple(check.registry)):
            problems.append(
                f"{key}: {value!r} must be a list of distinct ones of {tuple(check.registry)}"
            )
        elif check is BOOLEAN and not isinstance(value, bool):
            problems.append(f"{key}: {value!r} must be true or false")
        elif isinstance(check, Range) and not check.holds(value):
            problems.append(f"{key}: {value!r} must be {check.describe()}")
    return problems + combination_problems(hparams)


def distinct_of(value, allowed: tuple) -> bool:
    """Whether ``value`` is a list of distinct entries of ``allowed``."""
    return isinstance(value, list) and set(value) <= set(allowed) and len(set(value)) == len(value)


def combination_problems(hparams) -> list[str]:
    """Settings that are fine alone but not together."""
    problems = []
    limit = MARGIN_LIMITS.get(hparams.get("margin_type"))
    margin = hparams.get("margin")
    if limit is not None and RANGES["margin"].holds(margin) and margin >= limit:
        problems.append(
            f"margin: {margin!r} must be below {limit:.4g} for margin_type "
            f"{hparams['margin_type']!r}: the loss could not fall"
        )
    rate = hparams.get("sample_rate")
    for key in ("crop_seconds", "min_audio_seconds", "max_eval_seconds"):  # audio lengths
        seconds = hparams.get(key)
        usable = RANGES[key].holds(seconds) and RANGES["sample_rate"].holds(rate)
        if usable and seconds * rate < WAVLM_RECEPTIVE_FIELD:
            problems.append(
                f"{key}: {seconds!r} must be at least {WAVLM_RECEPTIVE_FIELD / rate:g} (WavLM's "
                f"receptive field, {WAVLM_RECEPTIVE_FIELD} samples at sample_rate {rate})"
            )
    if hparams.get("fusion", "none") != "none" and hparams.get("phrase_branch") is False:
        problems.append(f"fusion: {hparams['fusion']!r} needs phrase_branch: True (or none)")
    wavlm = hparams.get("wavlm")
    no_layer_weights = isinstance(wavlm, dict) and wavlm.get("layer_weighting") is False
    if hparams.get("phrase_branch") and no_layer_weights:
        problems.append("phrase_branch: True needs the WavLM encoder's layer_weighting: True")
    targets = hparams.get("lora_targets")
    attention = sorted(set(targets or ()) & set(adaptation.ATTENTION_PROJECTIONS))
    lora = hparams.get("wavlm_tuning") == "lora"
    if lora and attention and hparams.get("wavlm_attention") == "eager":
        problems.append(
            f"wavlm_tuning: 'lora' on {attention} needs wavlm_attention: sdpa (eager attention "
            "reads the projections' weights past any adapter)"
        )
    if hparams.get("head_type") == "mhfa" and no_layer_weights:
        problems.append("head_type: 'mhfa' needs the WavLM encoder's layer_weighting: True")
    corpus_name = hparams.get("corpus", "deepmine")
    for key in ("eval_key_file", "dev_key_file"):
        if hparams.get(key) and corpus_name != "deepmine":
            problems.append(
                f"{key}: keys a DeepMine list pair; corpus {corpus_name!r} labels its trials "
                "in its own trials file"
            )
    synthetic = hparams.get("synthetic_corpus")
    layouts = tuple(synth_deepmine.LAYOUTS)
    if isinstance(synthetic, dict) and synthetic.get("layout", layouts[0]) not in layouts:
        problems.append(
            f"synthetic_corpus: layout {synthetic['layout']!r} is not one of {', '.join(layouts)}"
        )
    if corpus_name != "deepmine" and hparams.get("synthetic_corpus"):
        problems.append(
            f"synthetic_corpus: writes DeepMine's layout, not corpus {hparams['corpus']!r}: "
            "set synthetic_corpus: null (data_prep/synth_kaldi.py writes a Kaldi-layout corpus)"
        )
    loader = hparams.get("train_dataloader_options")
    if isinstance(loader, dict) and loader.get("persistent_workers"):
        problems.append(
            "train_dataloader_options: persistent_workers must be False: the crops are keyed "
            "by the epoch, which workers started once would never see change "
            "(recipes/training/randomness.py)"
        )
    return problems


def raw_settings(hparams_file, overrides, moved=None) -> dict:
    """The settings of a HyperPyYAML file with overrides, as plain values: nothing is built.

    References are resolved by HyperPyYAML; tagged nodes (``!new:``, ``!name:``, ...) become
    plain mappings, lists or strings. ``moved``: see ``_yaml_source``.
    """
    try:
        with _yaml_source(hparams_file, moved) as handle:
            text = resolve_references(handle, overrides).getvalue()
    except DuplicateKeyError as error:
        raise SystemExit(f"error: {duplicate_key_message(error, hparams_file)}") from None
    yaml = ruamel.yaml.YAML(typ="safe", pure=True)
    yaml.Constructor = _PlainConstructor
    return yaml.load(text)


def _yaml_source(hparams_file, moved=None):
    """The file's text, as a stream HyperPyYAML reads (line numbers kept).

    ``moved``: ``(recorded, now)``, a run folder's path in its record and where it is now: every
    path under the recorded one is read under the new one (``relocated``).
    """
    if moved is None:
        return open(hparams_file, encoding="utf-8")
    return io.StringIO(relocated(Path(hparams_file).read_text(encoding="utf-8"), *moved))


def relocated(text: str, recorded: str, now: str) -> str:
    """``text`` with each path at or under the folder ``recorded`` moved under ``now``.

    A path is a value, or an item of a flow list, that starts with ``recorded`` followed by a
    separator or its end: a longer folder name that merely begins the same is left alone.
    """
    start, end = r"(?<=[\s\[,'\"])", r"(?=/|[\s\],'\"]|$)"
    pattern = re.compile(start + re.escape(recorded.rstrip("/")) + end, re.M)
    return pattern.sub(lambda _: now.rstrip("/"), text)


def duplicate_key_message(error: DuplicateKeyError, hparams_file) -> str:
    """A key given twice, named with where (the YAML's line, or the command line)."""
    key = re.search(r'duplicate key "([^"]*)"', error.problem or "")
    key = key.group(1) if key else "a key"
    mark = error.problem_mark
    where = "on the command line"
    if mark is not None and mark.name != "<unicode string>":
        where = f"in {hparams_file} (line {mark.line + 1})"
    return f"{key} is given twice {where}: give each setting once"


def _untagged(loader, suffix, node):
    """A tagged YAML node as the plain value it holds (mapping, list or string)."""
    if isinstance(node, ruamel.yaml.MappingNode):
        return {
            loader.construct_object(key, deep=True): loader.construct_object(value, deep=True)
            for key, value in node.value
        }
    if isinstance(node, ruamel.yaml.SequenceNode):
        return [loader.construct_object(value, deep=True) for value in node.value]
    return node.value


class _PlainConstructor(SafeConstructor):
    """A safe constructor that reads tagged nodes as plain values.

    Its own class: ruamel registers constructors on the class, and registering on the shared
    one would change how HyperPyYAML itself reads ``!ref`` later in the same process.
    """


_PlainConstructor.add_multi_constructor("!", _untagged)


def with_run_options(hparams_file, run_opts, overrides: str) -> str:
    """``overrides`` plus the run options given on the command line that the YAML also sets.

    SpeechBrain's parser takes its run options (``--grad_accumulation_factor``, ``--precision``,
    ``--eval_precision``, ...) out of the overrides: the Brain uses the command line's value, but
    ``hparams`` would keep the YAML's, and everything that reads ``hparams`` (the schedule's
    length, final scoring, export, ``verify_speakers.py``) would disagree with the Brain.
    """
    given = sorted(set(run_opts.overridden_args) & set(raw_settings(hparams_file, overrides)))
    lines = [f"{key}: {json.dumps(run_opts[key])}" for key in given]
    return "\n".join([overrides, *lines]).strip() if lines else overrides


def load_checked_hparams(argv, lock: bool = False):
    """SpeechBrain's command line -> ``(hparams_file, run_opts, overrides, hparams)``, checked.

    Bad settings end the program before the YAML builds anything, with every problem named.
    With ``lock`` (an entry script's run), the experiment folder is held first
    (``experiment_lock``).
    """
    import speechbrain as sb

    hparams_file, run_opts, overrides = sb.parse_arguments(argv)
    overrides = with_run_options(hparams_file, run_opts, overrides)
    hparams = checked_hparams(hparams_file, overrides, run_opts, lock)
    return hparams_file, run_opts, overrides, hparams


def checked_hparams(hparams_file, overrides: str, run_opts, lock: bool = False, moved=None) -> dict:
    """``hparams_file`` with ``overrides`` (YAML text), checked on its text, then loaded.

    With ``lock``, its ``output_folder`` is held for this process before anything is built
    (the demo YAML builds its WavLM there). ``moved``: a run folder's recorded path and its path
    now (``_yaml_source``).
    """
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml

    settings = raw_settings(hparams_file, overrides, moved)
    refuse_problems(hparams_file, settings_problems(settings))
    if lock:
        hold_experiment_lock(settings["output_folder"])
    # Before the YAML builds anything: a hub model is downloaded by one process per machine
    # while the others wait, which needs the process group (a no-op without torchrun).
    if not torch.distributed.is_initialized():
        sb.utils.distributed.ddp_init_group(run_opts)
    with _yaml_source(hparams_file, moved) as handle:
        return load_hyperpyyaml(handle, overrides)


def check_step_keys(step_file, overrides: str) -> None:
    """End the program when ``step_file`` is no step's YAML or the command line sets another key.

    A step's settings are few: the run's own (data, model, output folder) come from its record.
    """
    with open(step_file, encoding="utf-8") as handle:
        keys = list(ruamel.yaml.YAML(typ="rt").load(handle))  # tags kept, nothing resolved
    if "run_hparams" not in keys:
        raise SystemExit(
            f"error: {step_file} names no run (run_hparams): pass the step's YAML "
            "(hparams/verification.yaml or hparams/export.yaml) with --output_folder RUN, "
            "the output folder of a training run"
        )
    try:
        given = ruamel.yaml.YAML(typ="safe", pure=True).load(overrides or "{}") or {}
    except DuplicateKeyError as error:
        raise SystemExit(f"error: {duplicate_key_message(error, step_file)}") from None
    if not isinstance(given, dict):  # a stray argument, such as a second YAML
        raise SystemExit(f"error: unexpected argument(s) after {step_file}: {overrides}")
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise SystemExit(
            f"error: {', '.join(unknown)}: not a setting of {step_file} (its settings: "
            f"{', '.join(keys)}); a run's other settings come from its {RUN_RECORD}"
        )


def refuse_problems(hparams_file, problems: list[str]) -> None:
    """End the program naming every problem of ``hparams_file`` and its command line, if any."""
    if problems:
        raise SystemExit(
            f"error: {len(problems)} bad setting(s) in {hparams_file} or the command line:\n  "
            + "\n  ".join(problems)
        )


#: What a run's output folder holds that says how it was trained: SpeechBrain's copy of the
#: training YAML with the command line's settings applied (``create_experiment_directory``).
RUN_RECORD = "hyperparams.yaml"


#: Beside a run's record: its digest and its settings as training wrote them (``seal_record``).
RECORD_SEAL = "hyperparams.seal.json"


def seal_record(output_folder) -> None:
    """Record the digest and plain settings of a run's record, to tell a later edit by hand."""
    record = Path(output_folder) / RUN_RECORD
    text = record.read_text(encoding="utf-8")
    seal = {
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "settings": json.loads(json.dumps(raw_settings(record, ""), default=str)),
    }
    temporary = record.with_name(f".{RECORD_SEAL}.tmp")
    temporary.write_text(json.dumps(seal, indent=1), encoding="utf-8")
    os.replace(temporary, record.with_name(RECORD_SEAL))


def check_record(record: Path) -> None:
    """End the program when a run's record was edited since training, naming each change.

    A record without a seal (an experiment YAML given as ``run_hparams``) is read as it is.
    """
    seal_file = record.with_name(RECORD_SEAL)
    if not seal_file.is_file():
        return
    seal = json.loads(seal_file.read_text(encoding="utf-8"))
    if hashlib.sha256(record.read_bytes()).hexdigest() == seal.get("sha256"):
        return
    then = seal.get("settings") or {}
    try:
        now = json.loads(json.dumps(raw_settings(record, ""), default=str))
    except (Exception, SystemExit) as error:  # edited into something that does not load
        now, unreadable = {}, f" (it no longer loads: {error})"
    else:
        unreadable = ""
    changes = [
        f"{key}: {then[key]!r} -> {now[key]!r}" if key in then and key in now
        else (f"{key}: removed" if key in then else f"{key}: added")
        for key in sorted({*then, *now}) if then.get(key, ...) != now.get(key, ...)
    ]  # fmt: skip
    changed = "; ".join(changes) or "its text"
    raise SystemExit(
        f"error: {record} was edited since training{unreadable} ({changed}): a run's record "
        "says how it was trained, and steps read it as it is. Restore it; to score with other "
        "settings, give them to the step on its command line (hparams/verification.yaml's keys)"
    )


def load_step(argv) -> tuple:
    """SpeechBrain's command line of a step on a trained run -> ``(run_opts, step)``, checked.

    ``argv`` names a step's YAML (``hparams/verification.yaml``, ``hparams/export.yaml``); its
    keys are few, each set on the command line or null (null: the run's value, see
    ``load_run``). ``step`` is that YAML loaded.
    """
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml

    step_file, run_opts, overrides = sb.parse_arguments(argv)
    check_step_keys(step_file, overrides)
    try:
        overrides = with_run_options(step_file, run_opts, overrides)
        given = {k: v for k, v in raw_settings(step_file, overrides).items() if v is not None}
        refuse_problems(step_file, settings_problems(given))  # null: the run's, checked with it
        with open(step_file, encoding="utf-8") as handle:
            return run_opts, load_hyperpyyaml(handle, overrides)
    except ValueError as error:  # a !PLACEHOLDER left: --output_folder is missing
        raise SystemExit(f"error: {step_file}: {error} (--output_folder RUN)") from error


#: The training YAMLs this version ships: a run's record holds every setting they share.
TRAINING_YAMLS = ("wavlm_td.yaml", "synthetic_demo.yaml")


def _top_keys(text: str) -> set[str]:
    """The top-level keys of a YAML text."""
    return set(re.findall(r"^([A-Za-z_]\w*):", text, re.M))


def version_mismatch(record_text: str) -> str | None:
    """How a run's record differs from this version's training YAMLs, or None.

    A setting they all have that the record lacks (added since), or one the record has that none
    of them has (removed since: e.g. ``phrase_classifier_type``).
    """
    folder = Path(__file__).resolve().parents[1] / "hparams"
    keys = [_top_keys((folder / name).read_text("utf-8")) for name in TRAINING_YAMLS]
    recorded = _top_keys(record_text)
    missing, removed = set.intersection(*keys) - recorded, recorded - set.union(*keys)
    parts = [f"it lacks {', '.join(sorted(missing))}"] if missing else []
    parts += [f"it has {', '.join(sorted(removed))}, removed since"] if removed else []
    return "; ".join(parts) or None


def load_run(record, replacements: dict, run_opts) -> dict:
    """The hparams of the run that ``record`` describes, with ``replacements``, checked.

    ``record`` is a run's ``hyperparams.yaml`` (or any experiment YAML): the data, the model
    and the scoring are the run's own, so a step cannot disagree with what was trained. A None
    replacement keeps the run's value. A record written by another version of the recipe (a
    setting added or removed since) is refused. The run's output folder is held while the step
    runs.
    """
    record = Path(record)
    if not record.is_file():
        raise SystemExit(
            f"error: {record} not found: --output_folder must be the output folder of a "
            f"training run (train first: recipes/train_speaker_embeddings.py writes its "
            f"{RUN_RECORD})"
        )
    check_record(record)
    replaced = {key: value for key, value in replacements.items() if value is not None}
    run_overrides = "\n".join(f"{key}: {json.dumps(value)}" for key, value in replaced.items())
    text = record.read_text(encoding="utf-8")
    mismatch = version_mismatch(text)
    if mismatch:
        raise SystemExit(
            f"error: {record} was recorded by another version of this recipe: {mismatch}. "
            "A step reads a run as it was trained: score or export it with "
            "the version that trained it (its train_speaker_embeddings.py is beside the record), "
            "or train it again"
        )
    moved = moved_run(text, replaced.get("output_folder"))
    hparams = checked_hparams(record, run_overrides, run_opts, lock=True, moved=moved)
    hparams["recipe_settings"] = with_replacements(hparams["recipe_settings"], replaced)
    log_step(hparams["output_folder"])
    if moved is not None:
        logging.getLogger(__name__).info(
            "the run was recorded at %s and is now at %s: its own files (checkpoints, manifests, "
            "caches) are read and written there", *moved,
        )  # fmt: skip
    return hparams


def with_replacements(settings, replaced: dict):
    """The run's settings objects with a step's ``replaced`` keys, each set on its field.

    A record holds its settings objects resolved (SpeechBrain writes references as values), so
    a step's replacement of a key reaches its top-level entry but not the object built from it:
    it is set here on every settings object with a field of that name
    (``tests/test_settings.py`` checks that each key a step replaces has one).
    """
    parts = {}
    for name, part in settings._asdict().items():
        fields = {field.name for field in dataclasses.fields(part)}
        own = {key: value for key, value in replaced.items() if key in fields}
        parts[name] = dataclasses.replace(part, **own)
    return type(settings)(**parts)


def moved_run(record_text: str, now) -> tuple[str, str] | None:
    """``(recorded, now)`` when the run's folder is not where its record says (moved or copied).

    Then every path of the record under the recorded folder is read under ``now``: a copy never
    reads or writes the original's files, a moved run finds its own.
    """
    found = re.search(r"^output_folder:\s*(\S+)", record_text, re.M)
    if now is None or found is None:
        return None
    recorded = found.group(1).strip("'\"")
    if os.path.abspath(recorded) == os.path.abspath(now):
        return None
    return recorded, str(now)


def log_step(folder) -> None:
    """Log a step as training logs, with SpeechBrain's logging setup.

    INFO lines go to the console, and everything is appended to the run's ``log.txt``,
    starting with the step's command line.
    """
    import speechbrain as sb
    from speechbrain.core import DEFAULT_LOG_CONFIG

    if not sb.utils.distributed.if_main_process():
        return
    log_file = str(Path(folder) / "log.txt")
    sb.utils.logger.setup_logging(
        DEFAULT_LOG_CONFIG, {"handlers": {"file_handler": {"filename": log_file}}}
    )
    logging.getLogger(__name__).info("step on %s: %s", folder, " ".join(sys.argv))
