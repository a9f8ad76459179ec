#!/usr/bin/env python3
"""Write this recipe as it would sit in a SpeechBrain checkout (``docs/contributing_upstream.md``).

    python recipes/upstream_tree.py OUT

writes, under ``OUT`` (laid out like SpeechBrain's repository root):

- ``recipes/DeepMine/SpeakerRec/``: the entry scripts (``train_speaker_embeddings.py``,
  ``verify_speakers.py``, ``export_model.py``), ``hparams/``, ``data_prep/`` (the data
  preparation, as here), ``tdsv/`` (this repository's ``recipes/`` modules as a package: in
  SpeechBrain ``recipes`` is a folder of recipes, not a package), ``extra_requirements.txt``
  (what SpeechBrain itself does not require) and a ``README.md`` in SpeechBrain's recipe style;
- ``tests/recipes/DeepMine.csv``: our recipe-test rows with the tree's paths.

Imports and the YAML's ``!new:`` / ``!name:`` / ``!apply:`` tags are renamed from ``recipes.`` to
``tdsv.``, and the entry scripts put their own folder on ``sys.path`` (SpeechBrain's recipe tests
also put it on ``PYTHONPATH``). Nothing else changes: the files are this repository's.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Where the recipe goes in a SpeechBrain checkout.
RECIPE = Path("recipes") / "DeepMine" / "SpeakerRec"
#: The package our ``recipes/`` modules become there.
PACKAGE = "tdsv"
#: The scripts a user runs (SpeechBrain keeps them at the top of the recipe folder).
ENTRY_SCRIPTS = ("train_speaker_embeddings.py", "verify_speakers.py", "export_model.py")
#: Packages our recipe needs that SpeechBrain's own requirements.txt does not list.
EXTRA_REQUIREMENTS = (
    "scikit-learn>=1.3        # the fusion's logistic regressions",
    "matplotlib>=3.7          # DET plots",
    "espeakng-loader>=0.2     # the synthetic demo corpus only",
    "onnx>=1.17               # the export's ONNX models",
    "onnxscript>=0.5          # torch.onnx's dynamo exporter",
    "onnxruntime>=1.20        # the export's checks and the ONNX backend",
    "pyyaml>=6.0              # the ONNX backend reads the folder's hyperparams.yaml",
)
#: Modules of ``recipes/`` that are not part of the recipe (tools of this repository).
NOT_COPIED = ("upstream_tree.py",)


def renamed(text: str) -> str:
    """``text`` with the ``recipes`` package renamed to ``PACKAGE`` (imports, YAML tags, names)."""
    return re.sub(r"(?<![\w/.-])recipes(?=\.[\w\"']|\s+import\b)", PACKAGE, text)


def entry_script(text: str) -> str:
    """An entry script for the tree: renamed, with its own folder on ``sys.path``."""
    return renamed(text).replace(
        "sys.path.insert(0, str(Path(__file__).resolve().parents[1]))",
        "sys.path.insert(0, str(Path(__file__).resolve().parent))  # the recipe folder",
    )


def write_recipe(out: Path) -> Path:
    """The recipe folder of the tree; returns it."""
    recipe = out / RECIPE
    (recipe / PACKAGE).mkdir(parents=True)
    for module in sorted((ROOT / "recipes").rglob("*.py")):
        relative = module.relative_to(ROOT / "recipes")
        if module.name in NOT_COPIED or "__pycache__" in relative.parts:
            continue
        text = module.read_text(encoding="utf-8")
        if str(relative) in ENTRY_SCRIPTS:
            (recipe / module.name).write_text(entry_script(text), encoding="utf-8")
        else:  # the package keeps its subpackages (model/, training/, evaluation/)
            target = recipe / PACKAGE / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(renamed(text), encoding="utf-8")
    shutil.copytree(ROOT / "data_prep", recipe / "data_prep", ignore=_no_caches)
    (recipe / "hparams").mkdir()
    for hparams in sorted((ROOT / "hparams").glob("*.yaml")):
        (recipe / "hparams" / hparams.name).write_text(renamed(hparams.read_text()), "utf-8")
    (recipe / "extra_requirements.txt").write_text("\n".join(EXTRA_REQUIREMENTS) + "\n")
    (recipe / "README.md").write_text(recipe_readme(), encoding="utf-8")
    return recipe


def _no_caches(folder, names) -> list[str]:
    """``shutil.copytree``'s ignore: Python caches."""
    return [name for name in names if name == "__pycache__" or name.endswith(".pyc")]


def write_recipe_rows(out: Path) -> Path:
    """``tests/recipes/DeepMine.csv`` with the tree's paths; returns it."""
    with open(ROOT / "tests" / "recipes" / "DeepMine.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for column in ("Script_file", "Hparam_file", "Data_prep_file", "Readme_file"):
            row[column] = str(RECIPE / tree_path(row[column]))
    path = out / "tests" / "recipes" / "DeepMine.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def tree_path(path: str) -> str:
    """Where a file of this repository is in the recipe folder."""
    parts = Path(path).parts
    if parts[0] == "recipes":
        inside = Path(*parts[1:])
        return str(inside) if str(inside) in ENTRY_SCRIPTS else str(Path(PACKAGE, inside))
    return path  # hparams/, data_prep/, README.md keep their place


def recipe_readme() -> str:
    """The recipe folder's README, in SpeechBrain's recipe style (results with link slots)."""
    return f"""# Text-dependent speaker verification on DeepMine / SdSV / TdSV task 1 (WavLM)

WavLM fine-tuned with a speaker head (x-vector, ECAPA-TDNN or MHFA) and a pass-phrase branch on
the same WavLM pass; speaker and phrase scores fused into calibrated log-likelihood ratios on a
validation split of held-out training speakers. Evaluated as the challenge defines it: TC / TW /
IC / IW trials, EER, the SdSV minDCF, actual DCF and Cllr; each official list (eval, and TdSV
2024's dev) gets the challenge's answer file and a zip to upload.

## Installing extra dependencies

```
pip install -r extra_requirements.txt
```

## Data

The task-1 folder of DeepMine / SdSV 2020-21 / TdSV 2024 (`docs/`, `wav/`), either release's
lists (SdSV: `model_enrollment.txt` + `trials.txt`; TdSV 2024: `dev_*` and `eval_*` pairs with a
gender column). The demo YAML synthesizes a small corpus in exactly that layout (no data
needed).

## Training and evaluation

```
python train_speaker_embeddings.py hparams/wavlm_td.yaml --data_folder /path/to/task1
python train_speaker_embeddings.py hparams/synthetic_demo.yaml     # CPU demo, synthetic data
torchrun --nproc_per_node=4 train_speaker_embeddings.py hparams/wavlm_td.yaml --data_folder ...
python verify_speakers.py hparams/verification.yaml --output_folder results/wavlm_td/1986 \
    --score_norm as-norm
python export_model.py hparams/export.yaml --output_folder results/wavlm_td/1986
```

Scoring again and exporting are steps on a trained run: their YAMLs hold only their own settings,
and the run's (data, model, scoring) are read from the run's record, the `hyperparams.yaml` that
training writes into its output folder.

## Results

| Release | hyperparams file | TdSV 2024 dev EER / minDCF | eval EER / minDCF | Model link | GPUs |
|:---:|:---:|:---:|:---:|:---:|:---:|
| - | wavlm_td.yaml | (to be measured) | (to be measured) | [model](TODO) / [logs](TODO) | - |
| - | synthetic_demo.yaml | in the repository's README ("Results") | (same) | - | CPU (2 cores) |

The demo row is the synthetic corpus with a tiny random WavLM (a check that the recipe runs and
learns, not a result on real data).

## Modules (`{PACKAGE}/`)

`experiment` (data side, the model's assembly and a checkpoint's model), `settings` (start-up
checks, a step's YAML and the run's record), `experiment_lock` (one run per output folder),
`distributed` (evaluation under torchrun); `model/`: `speaker_model` (heads, phrase
branch, the embedding model, fused LLR, the inference interface copied into exports), `modules`
(WavLM encoder, margin losses); `training/`: `augmentation`, `sampling`, `schedules`,
`checkpointing`, `resume_guard`, `preemption`; `evaluation/`: `verification`, `scoring`, `fusion`,
`metrics`, `verification_report`, `submission`, `pretrained`; `tiny_wavlm` (the demo's random
WavLM).
"""


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a new folder (SpeechBrain's root layout)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty: choose a new folder")
    recipe = write_recipe(args.out)
    rows = write_recipe_rows(args.out)
    print(f"wrote {recipe} and {rows}")


if __name__ == "__main__":
    main()
