"""Using a trained model: export folder, offline loading, the file CLI and HF interop.

The export of a short recipe run loads offline (another folder, no repository on the path) and
scores a pair as the verification recipe does; the HF WavLMForXVector export has the same
embeddings; a plain HF x-vector model scores a recipe's trials; bad inputs fail with their name.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from ruamel.yaml import YAML
from scipy.signal import resample_poly
from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

from recipes.evaluation import pretrained
from recipes.evaluation.pretrained import (
    EXPORTED_CODE,
    exported_source,
    load_verifier,
    score_as_a_hub_user,
)
from recipes.evaluation.scoring import EmbeddingTable, score_trials
from recipes.evaluation.verification import quality_tag
from recipes.evaluation.verification_report import score_columns
from recipes.export_model import enrolment_thresholds, remove_leftovers, yaml_flow
from recipes.model.hf_xvector import hf_xvector_model
from recipes.model.onnx_verifier import OnnxVerifier
from recipes.model.speaker_model import (
    TDSVSpeakerRecognition,
    WavLMFromConfig,
    WavLMSpeakerEmbedder,
    XVectorHead,
)
from recipes.model.trial_decisions import DEFAULT_QUALITY, fused_llr, quality_features
from recipes.tiny_wavlm import TINY
from tests.helpers import (
    ROOT,
    experiment_record,
    run_script,
    run_script_command,
    two_at_a_time,
)


def cli(*args, cwd=ROOT):
    """Run verify_speakers.py in audio-file mode; the completed process."""
    command = [sys.executable, str(ROOT / "recipes" / "verify_speakers.py"), "files"]
    command += map(str, args)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


def tiny_embedder(layer_weighting=True, seed=0) -> WavLMSpeakerEmbedder:
    """A random tiny embedder whose BatchNorms have non-trivial statistics (eval mode)."""
    torch.manual_seed(seed)
    head = XVectorHead(96, (32, 32, 32, 32, 64), embedding_dim=16)
    encoder = WavLMFromConfig(TINY, output_all_hiddens=layer_weighting)
    embedder = WavLMSpeakerEmbedder(encoder, head)
    for norm in head.norms:
        for tensor in (norm.running_mean, norm.weight, norm.bias):
            tensor.data.normal_()
        norm.running_var.data.uniform_(0.5, 2.0)
    if layer_weighting:
        embedder.layer_logits.data.normal_()
    return embedder.eval()


@pytest.mark.parametrize("layer_weighting", [True, False])
def test_hf_export_has_the_same_embeddings(layer_weighting):
    embedder = tiny_embedder(layer_weighting)
    classifier = torch.nn.Linear(16, 5, bias=False)
    hf = hf_xvector_model(embedder, classifier, [f"spk{i}" for i in range(5)])
    wav = torch.randn(1, 24000) * 0.1
    with torch.no_grad():
        ours = embedder(wav).squeeze(1)
        theirs = hf(input_values=F.layer_norm(wav, wav.shape[1:])).embeddings
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert hf.config.id2label[3] == "spk3"
    assert torch.equal(hf.objective.weight, classifier.weight.t())


def test_thresholds_are_calibrated_per_number_of_enrollment_utterances():
    rng = np.random.default_rng(0)
    speakers = rng.normal(size=(6, 8))
    ids, vectors = [], []
    for s in range(6):
        for u in range(6):
            ids.append(f"s{s}u{u}")
            vectors.append(speakers[s] + 0.9 * rng.normal(size=8))
    table = EmbeddingTable(ids, np.array(vectors))
    models = pd.DataFrame(
        {
            "model_id": [f"m{s}" for s in range(6)],
            "enrol_ids": [f"s{s}u0 s{s}u1 s{s}u2" for s in range(6)],
        }
    )
    trials = pd.DataFrame(
        [
            (f"m{m}", f"s{s}u{u}", "TC" if m == s else "IC")
            for m in range(6)
            for s in range(6)
            for u in (3, 4, 5)
        ],
        columns=["model_id", "test_id", "condition"],
    )
    thresholds = enrolment_thresholds(table, models, trials)
    assert set(thresholds["eer"]) == {1, 2, 3}
    one = models.assign(enrol_ids=models["enrol_ids"].str.split().str[0])
    scores = score_trials(table, one, trials)
    targets, nontargets = scores[trials["condition"] == "TC"], scores[trials["condition"] == "IC"]
    threshold = thresholds["eer"][1]  # the EER point: misses and false alarms balance there
    assert abs((targets < threshold).mean() - (nontargets >= threshold).mean()) < 0.1
    assert thresholds["eer"][3] != thresholds["eer"][1]


def test_threshold_lookup_by_enrollment_size():
    verifier = TDSVSpeakerRecognition(
        modules={"embedding_model": torch.nn.Identity()},
        hparams={
            "operating_point": "eer",
            "thresholds": {"eer": {"1": 0.5, "3": 0.7}, "min_dcf": {"1": 0.9}},
        },
    )
    assert verifier.threshold(1) == 0.5 and verifier.threshold(2) == 0.5
    assert verifier.threshold(3) == 0.7 and verifier.threshold(10) == 0.7
    assert verifier.threshold(3, "min_dcf") == 0.9
    with pytest.raises(ValueError, match="operating point"):
        verifier.threshold(1, "frr")


@pytest.fixture(scope="module")
def exported(trained, tiny_corpus):
    """The short recipe run, exported: (experiment folder, export folder)."""
    out, _ = trained
    run_script("export_model.py", out, tiny_corpus)
    return out, out / "export"


def _wav_paths(out: Path, split: str, corpus: Path) -> pd.Series:
    """Audio path by utterance id for a split's enrollment and test utterances."""
    utts = pd.concat(
        pd.read_csv(out / "prep" / f"{split}_{name}.csv", dtype=str)
        for name in ("enrol_utts", "test")
    )
    return utts.set_index("ID")["wav"].str.replace("$data_root", str(corpus), regex=False)


def _valid_pair(out: Path, corpus: Path, condition: str | None = None, quality=DEFAULT_QUALITY):
    """A validation trial (the first, or the ``condition`` one least like its phrase), audio paths.

    Returns enrollment ids, test id, the trial's row of ``scores_valid.txt`` (``score``: the
    fused LLR, ``speaker``, ``phrase``, ...; with other quality measures ``quality``, the row of
    their tagged score file) and the audio path by utterance id.
    """
    models = pd.read_csv(out / "prep" / "valid_enrol.csv", dtype=str).set_index("model_id")
    report = "_".join(filter(None, ["valid", quality_tag(quality)]))
    trials = pd.read_csv(
        out / f"scores_{report}.txt", sep=" ", header=None, names=score_columns(quality)
    )
    if condition is not None:  # the trial of that condition with the lowest phrase score
        trials = trials[trials["condition"] == condition].sort_values("phrase", kind="stable")
    trial = trials.iloc[0]
    enrol_ids = models.loc[trial["model_id"], "enrol_ids"].split()
    return enrol_ids, trial["test_id"], trial, _wav_paths(out, "valid", corpus)


def _model_phrase(out: Path, model_id: str) -> str:
    """The enrolled phrase id of a validation model."""
    models = pd.read_csv(out / "prep" / "valid_enrol.csv", dtype=str).set_index("model_id")
    return models.loc[model_id, "phrase_id"]


@pytest.mark.slow
def test_export_folder_is_complete_and_self_checked(exported):
    out, folder = exported
    names = {p.name for p in folder.iterdir()}
    assert {
        "hyperparams.yaml",
        "tdsv_speaker_model.py",
        "embedding_model.ckpt",
        "label_encoder.txt",
    } <= names
    assert {"README.md", "export.json", "hf"} <= names
    facts = json.loads((folder / "export.json").read_text())
    cosines = [v for k, v in facts["checks"].items() if k.endswith("min_cosine")]
    assert len(cosines) == 4 and min(cosines) > 0.9999  # SpeechBrain, HF twice, ONNX
    assert facts["checks"]["phrase_max_logp_difference"] < 1e-3
    assert facts["fusion"]["kind"] == "llr" and "act_dcf" in facts["metrics"]["eval"]["pooled"]
    assert set(facts["thresholds"]["eer"]) == {"1", "2", "3"}
    card = (folder / "README.md").read_text()
    assert f"| valid | pooled | {facts['metrics']['valid']['pooled']['eer']:.2f} |" in card
    assert "The phrase check needs this SpeechBrain folder" in card
    # An untouched model: the code in the folder is the repository's, self-contained.
    for name, module in EXPORTED_CODE.items():
        assert (folder / name).read_text() == exported_source(module), name
    assert not list(folder.glob("tdsv_trial_decisions.py"))  # inlined: nothing beside them
    assert facts["checks"]["hub_load_score_difference"] <= 1e-5
    # The folder's own model, ONNX fp32 and int8: checked on the same seeded validation sample.
    assert {"model.onnx", "model.int8.onnx", "cohort.ckpt"} <= names and "cohort.npy" not in names
    assert set(facts["onnx"]) == {"model", "int8_model", "input", "outputs"}  # no decisions
    assert facts["checks"]["onnx_min_cosine"] > 0.9999
    trials = pd.read_csv(out / "prep" / "valid_trials.csv")
    for backend in ("folder", "onnx", "int8"):
        assert 0 < facts["checks"][f"{backend}_trials"] <= len(trials), backend
    assert facts["checks"]["folder_max_score_difference"] < 1e-3  # the run evaluates in fp32
    assert facts["checks"]["onnx_max_score_difference"] < 1e-3
    assert facts["checks"]["folder_decisions_differing"] == 0
    assert facts["checks"]["onnx_decisions_differing"] == 0
    assert facts["onnx"]["outputs"][0] == "speaker"
    assert facts["onnx_int8_metrics"] is None  # export_int8_metrics: false
    assert f"on the {facts['checks']['int8_trials']} sampled validation trials" in card


@pytest.mark.slow
def test_the_model_card_is_the_training_report_and_calibrated_on_the_recipes_embeddings(exported):
    """One scoring of a checkpoint: the export reads the recipe's, it does not embed it again."""
    out, folder = exported
    facts = json.loads((folder / "export.json").read_text())
    for split in ("valid", "eval"):
        report = json.loads((out / f"verification_{split}.json").read_text())["conditions"]
        assert set(facts["metrics"][split]) == set(report), split
        for condition, metrics in report.items():
            assert facts["metrics"][split][condition] == pytest.approx(metrics), condition
    cached = EmbeddingTable.load(out / "embeddings" / facts["checkpoint"] / "valid")
    models = pd.read_csv(out / "prep" / "valid_enrol.csv", dtype=str)
    trials = pd.read_csv(out / "prep" / "valid_trials.csv", dtype=str)
    expected = enrolment_thresholds(cached, models, trials)
    assert facts["thresholds"] == json.loads(json.dumps(expected))
    assert not (out / "embeddings" / facts["checkpoint"] / "export").exists()


def test_the_exported_code_is_self_contained(tmp_path):
    """Each exported file compiles alone and imports nothing of this repository."""
    for name, module in EXPORTED_CODE.items():
        source = exported_source(module)
        compile(source, name, "exec")
        imports = [
            line for line in source.splitlines() if line.lstrip().startswith(("from ", "import "))
        ]
        assert not [line for line in imports if "recipes" in line or "data_prep" in line], name
        assert "class TrialDecisions" in source, name
    clash = tmp_path / "clash.py"  # a module defining a name the inlined one defines too
    clash.write_text(
        "from recipes.model.trial_decisions import Verdict\n\n\ndef fused_llr():\n    pass\n"
    )
    module = type(pretrained)("clash")
    module.__file__ = str(clash)
    with pytest.raises(ValueError, match=r"both define \['fused_llr'\]"):
        exported_source(module)


@pytest.mark.slow
@pytest.mark.parametrize("from_hub", [False, True], ids=["folder_with_savedir", "hub"])
def test_a_copied_export_loads_the_speechbrain_way_without_the_repository(
    exported, tiny_corpus, tmp_path, from_hub
):
    """``foreign_class(..., savedir=...)`` from a copy, or from the hub (a stand-in cache)."""
    out, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    enrol_ids, test_id, recipe, wavs = _valid_pair(out, tiny_corpus)
    phrase = _model_phrase(out, recipe["model_id"])
    enrol, test = [wavs[i] for i in enrol_ids], wavs[test_id]
    expected = load_verifier(folder).verify_trial(enrol, test, phrase=phrase).score
    work = tmp_path / "work"
    work.mkdir()
    loaded = score_as_a_hub_user(copy, enrol, test, phrase, work, from_hub=from_hub)
    assert loaded["score"] == pytest.approx(expected, abs=1e-5)
    assert loaded["score"] == pytest.approx(recipe["score"], abs=1e-3)  # the recipe's own trial
    fetched = sorted(p.name for p in (work / "savedir").iterdir())
    assert "tdsv_speaker_model.py" in fetched and "embedding_model.ckpt" in fetched, fetched


@pytest.mark.slow
def test_a_folder_that_needs_the_repository_does_not_load_as_from_the_hub(exported, tmp_path):
    """What the export's check refuses: a module that imports this repository's code."""
    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    module = copy / "tdsv_speaker_model.py"
    module.write_text(module.read_text().replace(
        "from __future__ import annotations\n",
        "from __future__ import annotations\n\nimport recipes.model.trial_decisions\n", 1,
    ))  # fmt: skip
    (tmp_path / "work").mkdir()
    with pytest.raises(RuntimeError, match=r"does not load as SpeechBrain loads a model"):
        score_as_a_hub_user(copy, [], "x.wav", None, tmp_path / "work")


def _patched_export(out: Path, target: Path, patch: str) -> subprocess.CompletedProcess:
    """``export_model.py`` of the run ``out`` into ``target`` (no ONNX), ``patch`` run first."""
    command = run_script_command(
        "export_model.py", out, None, "--export_folder", str(target), "--export_onnx", "false"
    )
    script = f"import sys, torch; import recipes.export_model; {patch}; " + (
        "recipes.export_model.main(sys.argv[1:])"
    )
    return subprocess.run([sys.executable, "-c", script, *command[2:]], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)  # fmt: skip


@pytest.mark.slow
def test_an_export_whose_folder_needs_the_repository_is_not_published(exported, tmp_path):
    """The export of before (byte copies, importing this repository) fails its hub check."""
    out, _ = exported
    target = tmp_path / "refused"
    result = _patched_export(out, target, "import recipes.export_model as e; from pathlib import "
                             "Path; e.exported_source = lambda module: Path(module.__file__)"
                             ".read_text()")  # fmt: skip
    assert result.returncode != 0
    assert "does not load as SpeechBrain loads a model" in result.stderr, result.stderr[-3000:]
    assert "No module named 'recipes'" in result.stderr
    assert not target.exists()


def _planted(folder: Path, copy: Path, marker: Path) -> Path:
    """A copy of an export whose two Python files write ``marker`` when they are imported."""
    shutil.copytree(folder, copy)
    for name in ("tdsv_speaker_model.py", "tdsv_onnx_verifier.py"):
        module = copy / name
        future = "from __future__ import annotations\n"
        plant = f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text({name!r})\n"
        module.write_text(module.read_text().replace(future, future + plant, 1))
    return copy


@pytest.mark.slow
def test_a_model_folder_is_read_as_data_and_its_code_runs_only_when_trusted(
    exported, tiny_corpus, tmp_path
):
    out, folder = exported
    marker = tmp_path / "ran"
    copy = _planted(folder, tmp_path / "copy", marker)
    enrol_ids, test_id, recipe, wavs = _valid_pair(out, tiny_corpus)
    phrase = _model_phrase(out, recipe["model_id"])
    trial = ["--enrol", *(wavs[i] for i in enrol_ids), "--test", wavs[test_id], "--phrase", phrase]
    backends = ("pytorch", "onnx", "onnx-int8")  # the default and both torch-free ones
    calls = [("--model", folder), *(("--model", copy, "--backend", b) for b in backends)]
    original, *results = two_at_a_time(lambda call: cli(*call, *trial), calls)
    for result in (original, *results):
        assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists(), "a backend ran the folder's code"
    assert results[0].stdout == original.stdout  # the copy, read as data: the same decisions
    # A YAML tag that calls a function (HyperPyYAML runs it): refused, by line, before it runs.
    yaml_file = copy / "hyperparams.yaml"
    text = yaml_file.read_text()
    yaml_file.write_text(text + f"\nnote: !apply:os.system ['touch {marker}']\n")
    line = len((text + "\n").splitlines()) + 1
    result = cli("--model", copy, *trial)
    assert result.returncode != 0 and not marker.exists()
    assert f"{yaml_file} line {line}: !apply:os.system is not an object an export builds" in (
        result.stderr
    )
    steps = run_script_command("verify_speakers.py", out, None, "--model", str(copy))
    result = subprocess.run(steps, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode != 0 and not marker.exists()  # the recipe's trials: the same
    assert "!apply:os.system is not an object an export builds" in result.stderr
    assert "Wrote manifests" not in result.stdout + result.stderr  # refused before data prep
    # Asked for: SpeechBrain's foreign_class runs the folder's code (and its YAML's tags).
    yaml_file.write_text(text)
    result = cli("--model", copy, "--trust_model_code", *trial)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.read_text() == "tdsv_speaker_model.py"
    assert result.stdout == original.stdout


def test_a_pickled_object_in_a_model_folder_is_refused_by_name(exported, tmp_path):
    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    marker = tmp_path / "ran"
    torch.save({"weights": Payload(str(marker))}, copy / "embedding_model.ckpt")
    with pytest.raises(ValueError, match=r"embedding_model.ckpt: not a file of tensors"):
        load_verifier(copy)
    assert not marker.exists()


class Payload:
    """An object whose unpickling would write a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("ran",))


def _yaml_line(folder: Path, key: str, edit) -> None:
    """Replace the value of ``key:`` in an export's hyperparams.yaml by ``edit(value)``.

    The export writes its values as JSON (YAML flow collections), which ``edit`` gets parsed.
    """
    path = folder / "hyperparams.yaml"
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
    text = lines[index].split(":", 1)[1].split("#")[0].strip()
    lines[index] = f"{key}: " + edit(YAML(typ="safe").load(text) if text[:1] in "[{" else text)
    path.write_text("\n".join(lines) + "\n")


def _yaml_nan(folder: Path, key: str, path: str) -> None:
    """Put YAML's NaN (``.nan``) at a dotted ``path`` inside the JSON value of ``key``."""
    _yaml_line(folder, key, lambda v: yaml_flow(_with(v, path, math.nan)))


def _with(value: dict, path: str, new):
    """``value`` (parsed JSON) with the item at a dotted ``path`` replaced by ``new``."""
    *parents, last = path.split(".")
    item = value
    for key in parents:
        item = item[key]
    if new is _DROP:
        del item[last]
    else:
        item[last] = new
    return value


_DROP = object()


def _cohort(folder: Path, array) -> None:
    with open(folder / "cohort.ckpt", "wb") as handle:
        np.save(handle, array)


#: Damaged decision data of an export (one copy in hyperparams.yaml and cohort.ckpt, which both
#: backends read): (edit of a copy, what the error names).
DAMAGES = {
    "nan fusion bias": (
        lambda f: _yaml_nan(f, "fusion", "phrase.bias"),
        "hyperparams.yaml: fusion.phrase.bias nan: a finite number",
    ),
    "nan threshold": (
        lambda f: _yaml_nan(f, "thresholds", "eer.1"),
        "thresholds.eer.1 nan: a number, not NaN",
    ),
    "nan cost": (lambda f: _yaml_nan(f, "costs", "c_fa"), "costs {"),
    "seconds as text": (
        lambda f: _yaml_line(f, "max_eval_seconds", lambda v: '"8"'),
        "max_eval_seconds '8': a positive number of seconds",
    ),
    "rate as text": (
        lambda f: _yaml_line(f, "sample_rate", lambda v: '"16000"'),
        "sample_rate '16000': a whole number of Hz",
    ),
    "no operating point": (
        lambda f: _yaml_line(f, "operating_point", lambda v: "null"),
        "operating_point None: one of ('eer', 'min_dcf')",
    ),
    "phrase labels short": (
        lambda f: _yaml_line(f, "phrase_labels", lambda v: yaml_flow(v[:-1])),
        "phrase_labels: 10 labels for 11 phrase classes",
    ),
    "nan cohort": (
        lambda f: _cohort(f, np.full_like(np.load(f / "cohort.ckpt"), np.nan)),
        "non-finite values",
    ),
    "cohort of another width": (
        lambda f: _cohort(f, np.zeros((6, 3), np.float32)),
        "cohort of shape [6, 3]: rows of 64 values",
    ),
    "truncated cohort": (
        lambda f: (f / "cohort.ckpt").write_bytes((f / "cohort.ckpt").read_bytes()[:100]),
        "cohort.ckpt: not a readable array of numbers",
    ),
    "a pickled cohort": (
        lambda f: _cohort(f, np.array([{"not": "numbers"}], dtype=object)),
        "cohort.ckpt: not a readable array of numbers",
    ),
    "unfinished export": (
        lambda f: (f / "export.json").unlink(),
        "no export.json",
    ),
}


@pytest.mark.parametrize("backend", ["pytorch", "onnx"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_decision_data_is_refused_naming_file_and_key(exported, tmp_path, backend, damage):
    """Both backends read the same decision data, and refuse the same damage, by name."""
    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    edit, message = DAMAGES[damage]
    edit(copy)
    with pytest.raises(ValueError) as refused:
        (load_verifier if backend == "pytorch" else OnnxVerifier)(copy)
    assert message in str(refused.value) and str(copy) in str(refused.value)


def test_the_cli_names_damaged_decision_data_and_decides_nothing(exported, tiny_corpus, tmp_path):
    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    DAMAGES["nan threshold"][0](copy)
    DAMAGES["nan fusion bias"][0](copy)
    wav = str(next((tiny_corpus / "wav" / "evaluation").glob("*.wav")))
    for backend in ("pytorch", "onnx"):  # both name each problem of the one decision data
        result = cli("--model", copy, "--backend", backend, "--enrol", wav, "--test", wav)
        assert result.returncode != 0, result.stdout
        assert "accept" not in result.stdout and "reject" not in result.stdout  # no decision
        for named in ("thresholds.eer.1 nan", "fusion.phrase.bias nan"):
            assert named in result.stderr, result.stderr[-2000:]


def test_the_next_export_removes_an_interrupted_ones_leftovers(tmp_path):
    out = tmp_path / "export"
    staging = tmp_path / ".export.abc123"  # an export stopped before it published
    aside = tmp_path / ".export.previous.xyz" / "export"  # published halfway: the earlier one
    for folder in (staging, aside):
        folder.mkdir(parents=True)
        (folder / "hyperparams.yaml").write_text("sample_rate: 16000\n")
    (aside / "export.json").write_text("{}")
    remove_leftovers(out)  # out is not there: the earlier export is the only complete one
    assert not staging.exists() and aside.exists()
    out.mkdir()
    (out / "export.json").write_text("{}")
    remove_leftovers(out)
    assert not aside.parent.exists() and (out / "export.json").exists()


@pytest.mark.slow
def test_a_full_disk_during_an_export_is_named_and_publishes_nothing(exported, tmp_path):
    out, _ = exported
    target = tmp_path / "refused"
    full_disk = "RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64')"
    result = _patched_export(out, target, f"torch.save = lambda *a, **k: (_ for _ in ()).throw("
                             f"{full_disk})")  # fmt: skip
    assert result.returncode != 0
    assert f"cannot write the export of refused in {tmp_path} (" in result.stderr
    assert "MiB free on its disk" in result.stderr and f"{target} is as it was" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no staging folder, no partial export


@pytest.mark.slow
def test_export_loads_offline_elsewhere_and_scores_like_the_recipe(exported, tiny_corpus, tmp_path):
    out, folder = exported
    enrol_ids, test_id, _, wav = _valid_pair(out, tiny_corpus)
    checkpoint = json.loads((folder / "export.json").read_text())["checkpoint"]  # the exported
    table = EmbeddingTable.load(out / "embeddings" / checkpoint / "valid")  # not another's cache
    a, b = table.matrix[table.rows([enrol_ids[0], test_id], "pair")]
    expected = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    script = textwrap.dedent(
        f"""
        import json
        import importlib.util
        assert importlib.util.find_spec("recipes") is None  # the repository is not importable
        from speechbrain.inference.interfaces import foreign_class
        v = foreign_class(source={str(folder)!r}, pymodule_file="tdsv_speaker_model.py",
                          classname="TDSVSpeakerRecognition")
        verdict = v.verify_trial([{wav[enrol_ids[0]]!r}], {wav[test_id]!r})
        score, accept = v.verify_files({wav[enrol_ids[0]]!r}, {wav[test_id]!r})
        emb = v.encode_batch(v.load_audio({wav[test_id]!r}))
        print(json.dumps([verdict.speaker_score, float(score), bool(accept), verdict.threshold,
                          list(emb.shape)]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    speaker, llr, accept, threshold, shape = json.loads(result.stdout.strip().splitlines()[-1])
    assert speaker == pytest.approx(expected, abs=1e-4)
    assert threshold == pytest.approx(np.log(0.99 / 0.1))  # Bayes, SdSV costs
    assert accept == (llr >= threshold) and shape == [1, 1, 64]


def _valid_trial_pairs(out: Path, corpus: Path, path: Path) -> tuple[int, str]:
    """Write the validation trials of one enrolled phrase as a pairs file; their count, phrase.

    (The CLI takes one ``--phrase`` for a pairs file; a short run's phrase classifier may not
    recognize every enrollment.)
    """
    models = pd.read_csv(out / "prep" / "valid_enrol.csv", dtype=str).set_index("model_id")
    phrase = models["phrase_id"].mode()[0]
    trials = pd.read_csv(out / "prep" / "valid_trials.csv", dtype=str)
    trials = trials[trials["model_id"].map(models["phrase_id"]) == phrase]
    wavs = _wav_paths(out, "valid", corpus)
    enrol_ids = models["enrol_ids"].str.split()
    enrolments = {model: ",".join(wavs[i] for i in ids) for model, ids in enrol_ids.items()}
    lines = [
        f"{int(t.condition == 'TC')} {enrolments[t.model_id]} {wavs[t.test_id]}"
        for t in trials.itertuples()
    ]
    path.write_text("\n".join(lines) + "\n")
    return len(lines), phrase


@pytest.mark.slow
def test_the_onnx_backend_decides_every_validation_trial_like_the_pytorch_one(
    exported, tiny_corpus, tmp_path
):
    out, folder = exported
    count, phrase = _valid_trial_pairs(out, tiny_corpus, tmp_path / "pairs.txt")
    assert count > 20
    columns = {}
    for backend in ("pytorch", "onnx", "onnx-int8"):
        scores = tmp_path / f"{backend}.txt"
        result = cli(
            "--model", folder, "--pairs", tmp_path / "pairs.txt", "--backend", backend,
            "--phrase", phrase, "--out", scores,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [line.split() for line in scores.read_text().splitlines()]
        assert len(rows) == count  # enrol test speaker phrase llr decision [(reason)]
        columns[backend] = {
            "llr": np.array([float(row[4]) for row in rows]),
            "decision": [row[5] for row in rows],
        }
    pytorch, onnx = columns["pytorch"], columns["onnx"]
    assert np.abs(onnx["llr"] - pytorch["llr"]).max() < 1e-3
    assert onnx["decision"] == pytorch["decision"]
    # int8 decides with the same thresholds; its scores stay close, not equal
    assert np.corrcoef(columns["onnx-int8"]["llr"], pytorch["llr"])[0, 1] > 0.9


@pytest.mark.slow
def test_the_torch_free_example_decides_a_trial_like_the_speechbrain_folder(
    exported, tiny_corpus, tmp_path
):
    """``recipes/onnx_trial_example.py`` with torch unimportable, in the repository and alone.

    In the repository it reads the folder as data; copied out alone, it imports the folder's own
    code, with --trust_model_code only.
    """
    out, folder = exported
    enrol_ids, test_id, recipe, wavs = _valid_pair(out, tiny_corpus)
    enrol, test = [wavs[i] for i in enrol_ids], wavs[test_id]
    phrase = _model_phrase(out, recipe["model_id"])
    alone = tmp_path / "onnx_trial_example.py"
    shutil.copy(ROOT / "recipes" / "onnx_trial_example.py", alone)
    expected = load_verifier(folder).verify_trial(enrol, test, phrase=phrase)
    for example, trust in ((ROOT / "recipes" / "onnx_trial_example.py", []),
                           (alone, ["--trust_model_code"]), (alone, [])):  # fmt: skip
        script = textwrap.dedent(
            f"""
            import importlib.util, json, runpy, sys
            sys.modules["torch"] = None  # any import of torch fails
            sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
            assert importlib.util.find_spec("recipes") is None  # not importable from here
            sys.argv = ["example", {str(folder)!r}, "--enrol", *{enrol!r}, "--test", {test!r},
                        "--phrase", {phrase!r}, *{trust!r}]
            runpy.run_path({str(example)!r}, run_name="__main__")
            assert "speechbrain" not in sys.modules and sys.modules["torch"] is None
            """
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
            env=env, timeout=300,
        )  # fmt: skip
        if example == alone and not trust:  # the folder's code: only when asked for
            assert result.returncode != 0 and "add --trust_model_code" in result.stderr
            continue
        assert result.returncode == 0, result.stderr[-3000:]
        verdict = json.loads(result.stdout.strip().splitlines()[-1])
        assert verdict["score"] == pytest.approx(recipe["score"], abs=1e-3)  # the recipe's LLR
        assert verdict["score"] == pytest.approx(expected.score, abs=1e-3)
        assert verdict["accept"] == expected.accept and verdict["phrase"] == expected.phrase
        assert verdict["speaker_score"] == pytest.approx(expected.speaker_score, abs=1e-4)


@pytest.mark.slow
def test_cli_enrollment_reproduces_the_recipe_trial_score(exported, tiny_corpus):
    out, folder = exported
    enrol_ids, test_id, recipe, wavs = _valid_pair(out, tiny_corpus)
    paths = [wavs[i] for i in [*enrol_ids, test_id]]
    phrase = _model_phrase(out, recipe["model_id"])
    result = cli("--model", folder, "--enrol", *paths[:-1], "--test", paths[-1], "--phrase", phrase)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LLR threshold 2.2925 (Bayes: p_target 0.01, c_miss 10.0, c_fa 1.0)" in result.stdout
    path, speaker, phrase_score, llr, decision = result.stdout.strip().splitlines()[-1].split()[:5]
    assert path == paths[-1] and float(speaker) == pytest.approx(recipe["speaker"], abs=1e-4)
    assert float(phrase_score) == pytest.approx(recipe["phrase"], abs=1e-3)
    assert float(llr) == pytest.approx(recipe["score"], abs=1e-3)
    assert decision == ("accept" if float(llr) >= 2.2925 else "reject")


@pytest.mark.slow
def test_a_quality_aware_fusion_is_scored_exported_and_applied_by_the_cli(
    trained, tiny_corpus, tmp_path
):
    """``fusion_quality: [duration, cohort]`` reaches the recipe's reports, the export, the CLI.

    The exported folder carries the training speakers (``cohort.ckpt``) that the cohort measure
    compares a test and a model with, and computes durations from the audio it reads.
    """
    out, _ = trained
    quality = ("duration", "cohort")
    run_script("verify_speakers.py", out, tiny_corpus, "--fusion_quality", "[duration, cohort]")
    enrol_ids, test_id, recipe, wavs = _valid_pair(out, tiny_corpus, quality=quality)
    seconds = {i: sf.info(wavs[i]).duration for i in [*enrol_ids, test_id]}
    assert recipe["log_test_duration"] == pytest.approx(np.log(seconds[test_id]), abs=1e-4)
    enrol_seconds = sum(seconds[i] for i in enrol_ids)
    assert recipe["log_enrol_duration"] == pytest.approx(np.log(enrol_seconds), abs=1e-4)
    assert -1 < recipe["test_cohort_mean"] < 1 and -1 < recipe["model_cohort_mean"] < 1
    record = (out / "hyperparams.yaml").read_text()
    anchored = r"\nfusion_quality: (&id\d+ )?\[cohort\]"  # the record's settings objects alias it
    assert re.search(anchored, record)
    run = tmp_path / "quality_run.yaml"
    run.write_text(re.sub(anchored, r"\nfusion_quality: \1[duration, cohort]", record))
    folder = tmp_path / "export_quality"
    run_script(
        "export_model.py", out, tiny_corpus, "--run_hparams", str(run),
        "--export_folder", str(folder),
    )  # fmt: skip
    fusion = json.loads((folder / "export.json").read_text())["fusion"]
    assert fusion["quality"] == list(quality)
    assert fusion["phrase"]["features"][-4:] == list(quality_features(quality))
    assert (folder / "cohort.ckpt").is_file() and "cohort_top_k:" in (
        folder / "hyperparams.yaml"
    ).read_text()
    assert "weighting the quality measures duration, cohort" in (folder / "README.md").read_text()
    paths = [wavs[i] for i in [*enrol_ids, test_id]]
    phrase = _model_phrase(out, recipe["model_id"])
    result = cli("--model", folder, "--enrol", *paths[:-1], "--test", paths[-1], "--phrase", phrase)
    assert result.returncode == 0, result.stderr[-3000:]
    llr = float(result.stdout.strip().splitlines()[-1].split()[3])
    assert llr == pytest.approx(recipe["score"], abs=1e-3)


@pytest.mark.slow
def test_cli_rejects_another_pass_phrase_and_says_why(exported, tiny_corpus):
    out, folder = exported
    enrol_ids, test_id, recipe, wavs = _valid_pair(out, tiny_corpus, condition="TW")
    fusion = json.loads(next((out / "fusion").glob("*_none_cohort.json")).read_text())
    speaker_llr = float(fused_llr(fusion, recipe, kind="speaker"))  # the row's features
    assert recipe["score"] < speaker_llr  # the phrase score lowered the LLR of this TW trial
    # A threshold between the two: the speaker alone would be accepted, the phrase is wrong.
    threshold = (recipe["score"] + speaker_llr) / 2
    phrase = _model_phrase(out, recipe["model_id"])
    paths = [wavs[i] for i in [*enrol_ids, test_id]]
    result = cli(
        "--model", folder, "--enrol", *paths[:-1], "--test", paths[-1],
        "--phrase", phrase, "--threshold", threshold,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].endswith("reject (wrong pass-phrase)")


@pytest.mark.slow
def test_cli_rejects_a_replayed_enrollment_file_and_an_unknown_phrase(exported, tiny_corpus):
    out, folder = exported
    enrol_ids, _, recipe, wavs = _valid_pair(out, tiny_corpus)
    enrol = [wavs[i] for i in enrol_ids]
    phrase = _model_phrase(out, recipe["model_id"])
    replayed = cli("--model", folder, "--enrol", *enrol, "--test", enrol[1], "--phrase", phrase)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert replayed.stdout.strip().endswith("reject (replay of an enrollment file)")
    allowed = cli(
        "--model", folder, "--enrol", *enrol, "--test", enrol[1], "--phrase", phrase,
        "--allow_replay",
    )  # fmt: skip
    assert "replay" not in allowed.stdout.strip().splitlines()[-1]
    # "1" meant as "01": refused with the hint, not scored as a custom phrase.
    unknown = cli("--model", folder, "--enrol", *enrol, "--test", enrol[0], "--phrase", "1")
    assert unknown.returncode != 0 and "did you mean '01'" in unknown.stderr


@pytest.mark.slow
def test_cli_resamples_and_downmixes_and_says_so(exported, tiny_corpus, tmp_path):
    out, folder = exported
    enrol_ids, test_id, _, wavs = _valid_pair(out, tiny_corpus)
    enrol, test = wavs[enrol_ids[0]], wavs[test_id]
    samples, _ = sf.read(test)
    stereo = np.stack([resample_poly(samples, 441, 160)] * 2, axis=1)
    sf.write(tmp_path / "test_44k.wav", stereo, 44100)
    (tmp_path / "pairs.txt").write_text(f"{enrol} {test}\n{enrol} {tmp_path / 'test_44k.wav'}\n")
    result = cli("--model", folder, "--pairs", tmp_path / "pairs.txt")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resampled 44100 -> 16000 Hz, down-mixed 2 channels to mono" in result.stderr
    native, converted = (float(line.split()[2]) for line in result.stdout.strip().splitlines())
    assert converted == pytest.approx(native, abs=0.05)  # the speaker scores
    assert "upsampled" not in result.stdout  # 44.1 kHz has all the band the model knows


@pytest.mark.parametrize("backend", ["pytorch", "onnx"])
def test_band_limited_audio_is_flagged_in_the_verdict_and_the_cli(
    exported, tiny_corpus, tmp_path, backend
):
    out, folder = exported
    enrol_ids, test_id, recipe, wavs = _valid_pair(out, tiny_corpus)
    samples, _ = sf.read(wavs[test_id])
    narrow = tmp_path / "test_8k.wav"
    sf.write(narrow, resample_poly(samples, 1, 2), 8000)  # telephone band
    enrol = [wavs[i] for i in enrol_ids]
    phrase = _model_phrase(out, recipe["model_id"])
    if backend == "pytorch":
        verifier = load_verifier(folder)
    else:  # torch-free: resampled by the caller's function, as the CLI's onnx backend does
        verifier = OnnxVerifier(folder, resampler=lambda x, rate: resample_poly(x.mean(1), 2, 1))
    assert verifier.verify_trial(enrol, wavs[test_id], phrase=phrase).notes == ()
    verdict = verifier.verify_trial(enrol, narrow, phrase=phrase)
    assert verdict.notes == ("test upsampled from 8 kHz",)
    verdict = verifier.verify_trial([str(narrow), *enrol[1:]], wavs[test_id], phrase=phrase)
    assert verdict.notes == (f"1 of {len(enrol)} enrollment file(s) upsampled from 8 kHz",)
    result = cli("--model", folder, "--backend", backend, "--enrol", *enrol, "--test", narrow,
                 "--phrase", phrase)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].endswith("(test upsampled from 8 kHz)")


def test_cli_output_never_replaces_an_input_or_a_recording(tmp_path, tiny_corpus):
    wavs = sorted((tiny_corpus / "wav" / "evaluation").glob("*.wav"))[:3]
    victim, other = tmp_path / "victim.wav", tmp_path / "other.wav"
    shutil.copy(wavs[0], victim)
    shutil.copy(wavs[1], other)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{victim} {wavs[2]}\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "README.md").write_text("a model card")
    before = {path: path.read_bytes() for path in (victim, other, pairs, model / "README.md")}
    trial = ["--model", model, "--enrol", wavs[2], "--test", victim]
    cases = (
        ([*trial, "--out", victim], "is an input of this run"),
        ([*trial, "--out", other], "is an audio file: scores never replace a recording"),
        (["--model", model, "--pairs", pairs, "--out", pairs], "is an input of this run"),
        ([*trial, "--out", model / "README.md"], "is an input of this run"),
    )
    results = two_at_a_time(lambda case: cli(*case[0]), cases)
    for (_, reason), result in zip(cases, results, strict=True):
        assert result.returncode != 0 and reason in result.stderr, result.stderr[-2000:]
    assert {path: path.read_bytes() for path in before} == before  # nothing replaced


def test_cli_names_bad_pairs_lines_and_bad_model_folders(tmp_path, tiny_corpus):
    wav = next((tiny_corpus / "wav" / "evaluation").glob("*.wav"))
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"1 {wav} {wav}\n1 {wav},missing.wav {wav}\nmaybe {wav} {wav}\n")
    result = cli("--model", tmp_path, "--pairs", pairs)
    assert result.returncode != 0
    assert f"{pairs}:2: no such file missing.wav" in result.stderr
    assert f"{pairs}:3: expected '[label] enrol test'" in result.stderr
    pairs.write_text(f"{wav} {wav}\n")
    result = cli("--model", tmp_path, "--pairs", pairs)
    assert result.returncode != 0 and "not a model folder" in result.stderr
    pairs.write_bytes(f"# enrôlement\n{wav} {wav}\n".encode("latin-1"))
    result = cli("--model", tmp_path, "--pairs", pairs)
    assert result.returncode != 0
    assert f"{pairs}:1: not UTF-8 (byte 0xf4)" in result.stderr and "iconv" in result.stderr


@pytest.fixture(scope="module")
def hf_xvector_dir(tmp_path_factory) -> Path:
    """A tiny random transformers WavLMForXVector saved locally (the seed's published format)."""
    folder = tmp_path_factory.mktemp("hf") / "wavlm-xvector"
    torch.manual_seed(0)
    config = WavLMConfig(
        **TINY, tdnn_dim=(32, 32, 64), tdnn_kernel=(3, 3, 1), tdnn_dilation=(1, 2, 1)
    )
    config.architectures = ["WavLMForXVector"]
    WavLMForXVector(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_plain_hf_xvector_model_scores_the_recipe_trials(hf_xvector_dir, tiny_corpus, tmp_path):
    out = tmp_path / "exp"  # no run was trained: an experiment YAML names the data
    experiment = ("--run_hparams", str(experiment_record(tmp_path, tiny_corpus)))
    refused = subprocess.run(
        run_script_command("verify_speakers.py", out, tiny_corpus, *experiment,
                           "--model", str(hf_xvector_dir)),
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert refused.returncode != 0 and "add --fusion none" in refused.stderr
    output = run_script(
        "verify_speakers.py", out, tiny_corpus, *experiment, "--model", hf_xvector_dir,
        "--fusion", "none",
    )  # fmt: skip
    reports = list((out / "models").glob("*/verification_eval.json"))
    assert len(reports) == 1 and "eval: EER" in output
    lines = (reports[0].parent / "scores_eval.txt").read_text().splitlines()
    trials = (tiny_corpus / "docs" / "trials.txt").read_text().splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [t.split() for t in trials]
    # One trial by hand, the transformers way: feature extractor, embeddings, cosine.
    model_id, test_id, score = lines[0].split()[:3]
    enrol = pd.read_csv(out / "prep" / "eval_enrol.csv", dtype=str).set_index("model_id")
    wavs = _wav_paths(out, "eval", tiny_corpus)
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(hf_xvector_dir)
    model = WavLMForXVector.from_pretrained(hf_xvector_dir).eval()

    def embedding(utt_id):
        samples, rate = sf.read(wavs[utt_id])
        inputs = extractor(samples, sampling_rate=rate, return_tensors="pt")
        with torch.no_grad():
            return F.normalize(model(**inputs).embeddings[0], dim=0)

    enrolled = torch.stack([embedding(u) for u in enrol.loc[model_id, "enrol_ids"].split()])
    expected = F.cosine_similarity(enrolled.mean(0), embedding(test_id), dim=0)
    assert float(score) == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.slow
def test_an_mhfa_model_exports_a_self_checked_speechbrain_folder_without_hf(tmp_path, tiny_corpus):
    out = tmp_path / "mhfa"
    mhfa = ("--head_type", "mhfa")
    run_script("train_speaker_embeddings.py", out, tiny_corpus, *mhfa, "--number_of_epochs", "1")
    output = run_script("export_model.py", out, tiny_corpus)  # the run's record: MHFA
    folder = out / "export"
    assert "hf/ not written: transformers' WavLMForXVector holds only the x-vector head" in output
    assert not (folder / "hf").exists()
    facts = json.loads((folder / "export.json").read_text())
    assert facts["head"] == "tdsv_speaker_model.MHFAHead" and not facts["hf_folder"]
    assert not {k for k in facts["checks"] if k.startswith("hf_")}  # no HF folder, no HF check
    assert facts["checks"]["phrase_max_logp_difference"] < 1e-3
    assert facts["checks"]["hub_load_score_difference"] <= 1e-5  # MHFA's module loads alone too
    assert facts["checks"]["speechbrain_min_cosine"] > 0.9999
    assert facts["checks"]["onnx_min_cosine"] > 0.9999  # an MHFA model exports to ONNX too
    card = (folder / "README.md").read_text()
    assert "No `hf/` folder" in card and "WavLMForXVector.from_pretrained" not in card
    enrol_ids, test_id, trial, wav = _valid_pair(out, tiny_corpus)
    phrase = _model_phrase(out, trial["model_id"])
    verifier = load_verifier(folder)
    verdict = verifier.verify_trial([wav[i] for i in enrol_ids], wav[test_id], phrase=phrase)
    assert verdict.speaker_score == pytest.approx(trial["speaker"], abs=1e-4)
    assert verdict.score == pytest.approx(trial["score"], abs=1e-3)
