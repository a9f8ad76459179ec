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

import json
from pathlib import Path

import ruamel.yaml
import torch
from hyperpyyaml.core import resolve_references
from ruamel.yaml.constructor import SafeConstructor

from recipes import experiment
from recipes.evaluation import scoring
from recipes.experiment_lock import hold_experiment_lock
from recipes.model import modules, speaker_model

#: Enumerated settings: where the code that dispatches on each keeps its choices (module,
#: attribute: a tuple, or a dict of what each choice does). Read when checking, so a choice added
#: there is allowed here with no second list. ``head_type`` is checked against the YAML's own
#: ``heads`` (``choices``).
REGISTRIES = {
    "target_type": (experiment, "TARGET_TYPES"),
    "margin_type": (modules, "MARGIN_TYPES"),
    "scale_mode": (modules, "SCALE_MODES"),
    "batch_sampler": (experiment, "BATCH_SAMPLERS"),
    "score_norm": (scoring, "METHODS"),
    "on_bad_audio": (experiment, "BAD_AUDIO_ACTIONS"),
    "export_operating_point": (speaker_model, "OPERATING_POINTS"),
    "precision": (experiment, "PRECISION_CHOICES"),
    "eval_precision": (experiment, "PRECISION_CHOICES"),
    "phrase_pooling": (speaker_model, "PHRASE_POOLINGS"),
    "phrase_classifier_type": (speaker_model, "PHRASE_CLASSIFIERS"),
}


def choices(hparams) -> dict[str, tuple]:
    """Every enumerated setting and its allowed values, from the code's own registries."""
    allowed = {key: tuple(getattr(module, name)) for key, (module, name) in REGISTRIES.items()}
    allowed["fusion"] = ("none", *speaker_model.DECISION_KINDS)  # none: the speaker score
    allowed["phrase_branch"] = (True, False)
    if isinstance(hparams.get("heads"), dict):  # the heads the YAML wires (build_choice)
        allowed["head_type"] = tuple(hparams["heads"])
    return allowed


#: Numeric settings: (lowest allowed, whether the lowest is excluded).
RANGES = {
    "number_of_epochs": (1, False),
    "batch_size": (1, False),
    "crop_seconds": (0, True),
    "max_eval_seconds": (0, True),
    "dev_speakers": (1, False),
    "enrol_utts": (0, False),
    "total_steps": (1, False),  # or null: derived from the data
    "min_audio_seconds": (0, False),
    "phrase_loss_weight": (0, False),
    "l2sp_weight": (0, False),
    "phrase_margin": (0, False),
    "cohort_top_k": (1, False),
    "cohort_utts_per_speaker": (1, False),
}


def settings_problems(hparams) -> list[str]:
    """One line per bad setting (empty when all are usable)."""
    problems = []
    for key, allowed in choices(hparams).items():
        if key in hparams and hparams[key] not in allowed:
            shown = ", ".join(map(str, allowed))
            problems.append(f"{key}: {hparams[key]!r} is not one of {shown}")
    for key, (low, exclusive) in RANGES.items():
        value = hparams.get(key)
        if value is None:
            continue
        if not isinstance(value, int | float) or value < low or (exclusive and value == low):
            problems.append(f"{key}: {value!r} must be a number {'>' if exclusive else '>='} {low}")
    prior = hparams.get("fusion_prior")
    if prior is not None and not (isinstance(prior, int | float) and 0 < prior < 1):
        problems.append(f"fusion_prior: {prior!r} must be in (0, 1)")
    if hparams.get("fusion", "none") != "none" and hparams.get("phrase_branch") is False:
        problems.append(f"fusion: {hparams['fusion']!r} needs phrase_branch: True (or none)")
    wavlm = hparams.get("wavlm")
    no_layer_weights = isinstance(wavlm, dict) and wavlm.get("layer_weighting") is False
    if hparams.get("phrase_branch") and no_layer_weights:
        problems.append("phrase_branch: True needs the WavLM encoder's layer_weighting: True")
    if hparams.get("phrase_margin") and hparams.get("phrase_classifier_type") == "linear":
        problems.append(
            f"phrase_margin: {hparams['phrase_margin']!r} needs phrase_classifier_type: cosine"
        )
    if hparams.get("head_type") == "mhfa" and no_layer_weights:
        problems.append("head_type: 'mhfa' needs the WavLM encoder's layer_weighting: True")
    return problems


def raw_settings(hparams_file, overrides) -> dict:
    """The settings of a HyperPyYAML file with overrides, as plain values: nothing is built.

    References are resolved by HyperPyYAML; tagged nodes (``!new:``, ``!name:``, ...) become
    plain mappings, lists or strings.
    """
    with open(hparams_file, encoding="utf-8") as handle:
        text = resolve_references(handle, overrides).getvalue()
    yaml = ruamel.yaml.YAML(typ="safe", pure=True)
    yaml.Constructor = _PlainConstructor
    return yaml.load(text)


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


def checked_hparams(hparams_file, overrides: str, run_opts, lock: bool = False) -> dict:
    """``hparams_file`` with ``overrides`` (YAML text), checked on its text, then loaded.

    With ``lock``, its ``output_folder`` is held for this process before anything is built
    (the demo YAML builds its WavLM there).
    """
    import speechbrain as sb
    from hyperpyyaml import load_hyperpyyaml

    settings = raw_settings(hparams_file, overrides)
    refuse_problems(hparams_file, settings_problems(settings))
    if lock:
        hold_experiment_lock(settings["output_folder"])
    # Before the YAML builds anything: a hub model is downloaded by one process per machine
    # while the others wait, which needs the process group (a no-op without torchrun).
    if not torch.distributed.is_initialized():
        sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as handle:
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
    given = ruamel.yaml.YAML(typ="safe", pure=True).load(overrides or "{}") or {}
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


def load_run(record, replacements: dict, run_opts) -> dict:
    """The hparams of the run that ``record`` describes, with ``replacements``, checked.

    ``record`` is a run's ``hyperparams.yaml`` (or any experiment YAML): the data, the model
    and the scoring are the run's own, so a step cannot disagree with what was trained. A None
    replacement keeps the run's value. The run's output folder is held while the step runs.
    """
    record = Path(record)
    if not record.is_file():
        raise SystemExit(
            f"error: {record} not found: --output_folder must be the output folder of a "
            f"training run (train first: recipes/train_speaker_embeddings.py writes its "
            f"{RUN_RECORD})"
        )
    replaced = {key: value for key, value in replacements.items() if value is not None}
    run_overrides = "\n".join(f"{key}: {json.dumps(value)}" for key, value in replaced.items())
    return checked_hparams(record, run_overrides, run_opts, lock=True)
