"""Load a trained speaker model from a folder and embed datasets with it.

Two kinds of folder are accepted, so that models from both ecosystems are scored the same way:

- a folder written by ``recipes/export_model.py`` (SpeechBrain: ``hyperparams.yaml`` and
  ``tdsv_speaker_model.py``), read as data by this repository's code (``load_exported``): its
  YAML without constructing any object it names, its tensors with ``weights_only``; the folder's
  own code (SpeechBrain's ``foreign_class``) runs only when asked (``trust_model_code``);
- a Hugging Face ``*ForXVector`` directory (``config.json``, weights, ``preprocessor_config.json``),
  e.g. a local copy of ``aliyzd95/wavlm-deepmine-base-plus-sv`` or the ``hf/`` folder of an
  export, run the way ``transformers`` runs it (its feature extractor, its ``embeddings`` output).

Both come back as a ``TDSVSpeakerRecognition`` (``encode_batch``, ``verify_files``,
``verify_enrolment``, ...).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import speechbrain as sb
import torch
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.nodes import MappingNode, SequenceNode
from speechbrain.dataio.preprocess import AudioNormalizer
from speechbrain.inference.interfaces import foreign_class
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
from speechbrain.utils.fetching import LocalStrategy
from torch import nn
from tqdm import tqdm
from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

from recipes.evaluation.scoring import EmbeddingTable
from recipes.model import onnx_verifier, speaker_model, trial_decisions
from recipes.model.onnx_verifier import check_finished
from recipes.model.speaker_model import TDSVSpeakerRecognition
from recipes.model.trial_decisions import (
    COHORT_FILE,
    DECISION_KEYS,
    check_decisions,
    check_model_outputs,
)

#: The name of the model code inside an exported folder.
EXPORTED_MODULE = "tdsv_speaker_model.py"
#: The repository's code an exported folder carries, by its name there: the SpeechBrain model
#: and the torch-free ONNX verifier, each one self-contained file (``exported_source``).
EXPORTED_CODE = {
    EXPORTED_MODULE: speaker_model,
    "tdsv_onnx_verifier.py": onnx_verifier,
}
#: The repository module both exported files carry inlined: the decisions both backends share.
INLINED = trial_decisions


def exported_source(module) -> str:
    """The source of ``module`` (an ``EXPORTED_CODE`` value) as an exported folder holds it.

    Its ``from recipes.model.trial_decisions import ...`` is replaced by that module's code
    (``INLINED``, without its docstring and ``__future__`` import), so the one file SpeechBrain's
    ``foreign_class`` fetches (``pymodule_file``: into a ``savedir``, from a folder or the
    Hugging Face hub) needs nothing beside it and nothing of this repository. A name that both
    define is refused: one would silently replace the other.
    """
    source = Path(module.__file__).read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    imports = [
        node for node in ast.parse(source).body
        if isinstance(node, ast.ImportFrom) and node.module == INLINED.__name__
    ]  # fmt: skip
    if len(imports) != 1:
        raise ValueError(f"{module.__file__}: expected one import from {INLINED.__name__}")
    inlined = _inlined_source()
    both = _defined(ast.parse(source)) & _defined(ast.parse(inlined))
    if both:
        raise ValueError(f"{module.__file__} and {INLINED.__file__} both define {sorted(both)}")
    start, end = imports[0].lineno - 1, imports[0].end_lineno
    banner = f"# ---- {Path(INLINED.__file__).name}, inlined by recipes/export_model.py ----\n"
    return "".join([*lines[:start], banner, inlined, "# ---- end ----\n", *lines[end:]])


def _inlined_source() -> str:
    """``INLINED``'s code without its module docstring and ``from __future__`` import."""
    source = Path(INLINED.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    lines = source.splitlines(keepends=True)
    return "".join(lines[future[-1].end_lineno :] if future else lines)


def _defined(tree: ast.Module) -> set[str]:
    """The functions and classes a module defines at its top level."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {node.name for node in tree.body if isinstance(node, kinds)}


class HFXVectorEmbedder(nn.Module):
    """A ``transformers`` x-vector model (``WavLMForXVector`` and kin) as an embedding module.

    The waveform goes through the model's own feature extractor (zero mean, unit variance when
    its ``do_normalize`` says so), and the output is the model's ``embeddings``.
    """

    def __init__(self, source):
        super().__init__()
        self.model = AutoModelForAudioXVector.from_pretrained(source)
        self.extractor = AutoFeatureExtractor.from_pretrained(source)
        self.sample_rate = self.extractor.sampling_rate

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings ``[B, 1, D]`` of unpadded waveforms ``[B, T]``."""
        if wav_lens is not None and bool((wav_lens < 1).any()):
            raise ValueError("HFXVectorEmbedder embeds unpadded waveforms (one at a time)")
        inputs = self.extractor(
            list(wavs.float().cpu().numpy()), sampling_rate=self.sample_rate, return_tensors="pt"
        )
        inputs = {k: v.to(wavs.device) for k, v in inputs.items()}
        return self.model(**inputs).embeddings.unsqueeze(1)


def is_hf_xvector(folder: Path) -> bool:
    """True if ``folder`` holds a Hugging Face ``*ForXVector`` model."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(name.endswith("ForXVector") for name in architectures)


def load_verifier(
    folder, run_opts: dict | None = None, trust_model_code: bool = False, complete: bool = True
) -> TDSVSpeakerRecognition:
    """The model in ``folder`` (exported SpeechBrain folder or HF x-vector directory).

    An exported folder is read as data (``load_exported``, ``complete`` passed on);
    ``trust_model_code`` loads it as SpeechBrain's ``foreign_class`` does instead, running its
    ``hyperparams.yaml`` and ``tdsv_speaker_model.py``: only for a folder from a source you trust.
    """
    folder = Path(folder)
    run_opts = {"device": "cpu", **(run_opts or {})}
    if (folder / "hyperparams.yaml").is_file() and (folder / EXPORTED_MODULE).is_file():
        if not trust_model_code:
            return load_exported(folder, run_opts, complete)
        return foreign_class(
            source=str(folder),
            pymodule_file=EXPORTED_MODULE,
            classname="TDSVSpeakerRecognition",
            savedir=str(folder),
            local_strategy=LocalStrategy.NO_LINK,  # use the files in place, copy nothing
            run_opts=run_opts,
        )
    if is_hf_xvector(folder):
        embedder = HFXVectorEmbedder(folder)
        hparams = {"thresholds": None, "audio_normalizer": AudioNormalizer(embedder.sample_rate)}
        return TDSVSpeakerRecognition(
            modules={"embedding_model": embedder}, hparams=hparams, run_opts=run_opts
        )
    raise FileNotFoundError(
        f"{folder}: not a model folder. Expected an export of recipes/export_model.py "
        f"(hyperparams.yaml + {EXPORTED_MODULE}) or a Hugging Face *ForXVector directory "
        "(config.json with its architecture, weights, preprocessor_config.json)"
    )


# ------------------------------------------------------------------------------------------------
# An exported folder read as data. Its hyperparams.yaml is HyperPyYAML, which constructs the
# objects its tags name and can call any function (!apply:); SpeechBrain's foreign_class also
# imports the folder's own module. Here the YAML is parsed as plain data (a tag becomes a
# ``Tagged`` value, nothing is constructed), every tag must be one the export writes, and the
# model is built from this repository's classes (``BUILDABLE``) with the folder's weights
# loaded as tensors only (``weights_only``): a downloaded folder cannot run code.
# ------------------------------------------------------------------------------------------------
class Tagged(NamedTuple):
    """A tagged YAML node, kept as data: its tag, its value, its line in the file."""

    tag: str
    value: object
    line: int


class _DataConstructor(SafeConstructor):
    """ruamel's safe constructor (YAML 1.2, as HyperPyYAML reads), every ``!tag`` kept as data."""


def _tagged(constructor, suffix: str, node) -> Tagged:
    """A ``Tagged`` of ``node`` (its value parsed as plain data)."""
    if isinstance(node, MappingNode):
        value = constructor.construct_mapping(node, deep=True)
    elif isinstance(node, SequenceNode):
        value = constructor.construct_sequence(node, deep=True)
    else:
        value = constructor.construct_scalar(node)
    return Tagged(f"!{suffix}", value, node.start_mark.line + 1)


_DataConstructor.add_multi_constructor("!", _tagged)


#: The classes an exported ``hyperparams.yaml`` may build, all of them this repository's (or
#: SpeechBrain's and torch's): the folder's copy of the model code is never imported.
BUILDABLE = {
    **{
        f"{Path(EXPORTED_MODULE).stem}.{name}": cls
        for name, cls in vars(speaker_model).items()
        if isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and cls.__module__ == speaker_model.__name__
        and not issubclass(cls, TDSVSpeakerRecognition)  # the verifier: made by the loader
    },
    "speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN": ECAPA_TDNN,
    f"{Path(EXPORTED_MODULE).stem}.TrainingSpeakers": speaker_model.TrainingSpeakers,
}
#: Other tags an export writes, for objects this loader makes itself (``load_exported``).
NOT_BUILT = {
    "!new:speechbrain.dataio.preprocess.AudioNormalizer",
    "!new:speechbrain.utils.parameter_transfer.Pretrainer",
}


class UntrustedModelCode(ValueError):
    """A model folder asks to run code (or to build objects) that an export never writes."""


def read_exported_yaml(path: Path) -> dict:
    """``hyperparams.yaml`` of an exported folder as plain data, its tags checked, none run."""
    reader = YAML(typ="safe", pure=True)
    reader.Constructor = _DataConstructor
    try:
        data = reader.load(path.read_text(encoding="utf-8"))
    except (YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not readable as YAML ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    for tagged in _tags(data):
        allowed = tagged.tag == "!ref" or tagged.tag in NOT_BUILT
        if not allowed and tagged.tag.removeprefix("!new:") not in BUILDABLE:
            raise UntrustedModelCode(
                f"{path} line {tagged.line}: {tagged.tag} is not an object an export builds (only "
                f"!ref and !new: of the recipe's model classes): loading it would run code. Load "
                "this folder with trust_model_code=True (verify_speakers.py --trust_model_code) "
                "only if you trust where it came from"
            )
    return data


def _tags(value):
    """Every ``Tagged`` value inside ``value``, depth first."""
    if isinstance(value, Tagged):
        yield value
        value = value.value
    if isinstance(value, dict):
        for item in value.values():
            yield from _tags(item)
    elif isinstance(value, list):
        for item in value:
            yield from _tags(item)


def build_exported(value, data: dict, path: Path):
    """``value`` of an exported YAML with its ``!ref`` resolved and its ``!new:`` built."""
    if isinstance(value, Tagged):
        if value.tag == "!ref":
            key = str(value.value).strip().removeprefix("<").removesuffix(">")
            if key not in data:
                raise ValueError(f"{path} line {value.line}: !ref to {key}, which it does not set")
            return build_exported(data[key], data, path)
        arguments = build_exported(value.value, data, path)
        cls = BUILDABLE[value.tag.removeprefix("!new:")]
        return cls(**arguments) if isinstance(arguments, dict) else cls(*(arguments or []))
    if isinstance(value, dict):
        return {key: build_exported(item, data, path) for key, item in value.items()}
    if isinstance(value, list):
        return [build_exported(item, data, path) for item in value]
    return value


def load_weights(module: nn.Module, path: Path) -> None:
    """``path``'s tensors into ``module`` (tensors only: a pickled object is refused, named)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the model folder") from None
    except Exception as error:  # pickle's and torch's errors name no file
        raise ValueError(
            f"{path}: not a file of tensors ({type(error).__name__}: {str(error)[:300]})"
        ) from None
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: does not fit the model of hyperparams.yaml: {error}") from None


def load_exported(folder: Path, run_opts: dict, complete: bool = True) -> TDSVSpeakerRecognition:
    """An exported folder as a ``TDSVSpeakerRecognition``, read as data (nothing of it runs).

    Its decision data is checked (``trial_decisions.check_decisions``), and against the model's
    outputs for one second of silence (``check_model_outputs``). ``complete``: refuse a folder
    without ``export.json``, the file an export writes last (False: the export's own checks of
    the folder it is writing).
    """
    path = folder / "hyperparams.yaml"
    if complete:
        check_finished(folder)
    data = read_exported_yaml(path)
    if "embedding_model" not in data:
        raise ValueError(f"{path}: no embedding_model: not an export of recipes/export_model.py")
    hparams = {key: data.get(key) for key in DECISION_KEYS}
    check_decisions(hparams, str(path))
    hparams["audio_normalizer"] = AudioNormalizer(data["sample_rate"])
    model = build_exported(data["embedding_model"], data, path)
    load_weights(model, folder / "embedding_model.ckpt")
    if data.get("cohort") is not None:
        hparams["cohort"] = build_exported(data["cohort"], data, path)
        hparams["cohort"].load(folder / COHORT_FILE)
    verifier = TDSVSpeakerRecognition(
        modules={"embedding_model": model}, hparams=hparams, run_opts=run_opts
    )
    probe = verifier.embed_waveform(torch.zeros(data["sample_rate"]))
    cohort = verifier.cohort_matrix() if data.get("cohort") is not None else None
    check_model_outputs(probe, hparams, cohort, f"{path} with {folder / 'embedding_model.ckpt'}")
    return verifier


#: The repository id and revision an exported folder has in ``hub_cache_stand_in``.
STAND_IN_REPO, STAND_IN_REVISION = "tdsv/exported-model", "0" * 40


def hub_cache_stand_in(folder: Path, cache: Path, repo_id: str = STAND_IN_REPO) -> Path:
    """A Hugging Face cache (``HF_HOME``) that holds ``folder`` as the hub repository ``repo_id``.

    What downloading an uploaded export leaves in the cache (``hub/models--<id>/snapshots/<rev>``
    and ``refs/main``; files linked, not copied): with ``HF_HUB_OFFLINE=1``, SpeechBrain fetches
    ``source=repo_id`` from it through ``huggingface_hub`` exactly as from the hub, minus the
    network. Returns ``cache``.
    """
    repo = Path(cache) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / STAND_IN_REVISION
    for file in Path(folder).rglob("*"):
        if file.is_file():
            (snapshot / file.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / file.relative_to(folder)).symlink_to(file.absolute())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(STAND_IN_REVISION)
    return Path(cache)


#: Run by ``score_as_a_hub_user`` in an interpreter that cannot import this repository.
HUB_USER_SCRIPT = """
import importlib.util, json, sys
args = json.loads(sys.argv[1])
sys.path[1:1] = args["package_paths"]  # where the user's packages are, as PYTHONPATH gave them
assert importlib.util.find_spec(args["package"]) is None, "the repository is importable"
from speechbrain.inference.interfaces import foreign_class
verifier = foreign_class(source=args["source"], pymodule_file="tdsv_speaker_model.py",
                         classname="TDSVSpeakerRecognition", savedir=args["savedir"])
verdict = verifier.verify_trial(args["enrol"], args["test"], phrase=args["phrase"])
print(json.dumps({"score": float(verdict.score), "speaker_score": float(verdict.speaker_score)}))
"""


def score_as_a_hub_user(folder, enrol, test, phrase, workdir, from_hub=True) -> dict:
    """One trial scored by ``folder`` loaded as SpeechBrain documents it, without this repository.

    A fresh interpreter (``python -I``: no working folder on the path, run in ``workdir``, and of
    ``PYTHONPATH`` only the folders outside this repository, ``package_paths``) calls
    ``foreign_class(source, pymodule_file="tdsv_speaker_model.py",
    classname="TDSVSpeakerRecognition", savedir=...)`` with ``source`` the stand-in hub
    repository of ``folder`` (``from_hub``, ``hub_cache_stand_in``) or the folder itself, and
    scores ``test`` against ``enrol`` (audio paths) for ``phrase``. Returns ``{"score",
    "speaker_score"}``; a failure raises ``RuntimeError`` with what the interpreter said.
    """
    workdir = Path(workdir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    source = str(Path(folder).absolute())
    if from_hub:  # the stand-in is the only hub cache there (a user's HF_HUB_CACHE too)
        cache = hub_cache_stand_in(folder, workdir / "hf_home")
        env.update(HF_HOME=str(cache), HF_HUB_CACHE=str(cache / "hub"))
        env.pop("HUGGINGFACE_HUB_CACHE", None)
        source = STAND_IN_REPO
    args = {
        "source": source, "savedir": str(workdir / "savedir"), "phrase": phrase,
        "enrol": [str(Path(p).absolute()) for p in enrol], "test": str(Path(test).absolute()),
        "package": __name__.split(".")[0],  # this repository's package, unimportable there
        "package_paths": package_paths(),
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-I", "-c", HUB_USER_SCRIPT, json.dumps(args)],
        capture_output=True, text=True, cwd=workdir, env=env, timeout=600,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(
            f"{folder} does not load as SpeechBrain loads a model (foreign_class with a savedir, "
            f"source {source}, no repository):\n{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def package_paths() -> list[str]:
    """The folders of ``PYTHONPATH`` other than this repository (and folders in it).

    Packages installed with ``pip install --target`` are reached that way (the GPU machine's
    ``tests/benchmarks/device_kit.py``): a user's interpreter has them, not this repository.
    """
    repository = Path(__file__).resolve().parents[2]
    paths = [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [str(p) for p in paths if p != repository and repository not in p.parents]


def embed_dataset(verifier, dataset, loader_kwargs: dict, progress=True) -> dict:
    """Tables of every utterance (``id``, ``sig``) of a SpeechBrain dataset.

    ``verifier``: anything with ``embed_waveform`` (``TDSVSpeakerRecognition``, ``OnnxVerifier``).

    ``"speaker"`` embeddings, and the phrase branch's outputs when the model has one (one WavLM
    pass per utterance either way).
    """
    loader = sb.dataio.dataloader.make_dataloader(dataset, **loader_kwargs)
    outputs = {}
    for batch in tqdm(loader, desc="embedding", disable=not progress):
        for utt_id, wav, rel in zip(batch.id, batch.sig.data, batch.sig.lengths, strict=True):
            samples = max(1, round(float(rel) * wav.shape[0]))
            for name, vector in verifier.embed_waveform(wav[:samples]).items():
                if name != "seconds":  # the recipe's durations are the manifests'
                    outputs.setdefault(name, {})[utt_id] = np.asarray(vector)
    return {name: EmbeddingTable.from_dict(vectors) for name, vectors in outputs.items()}
