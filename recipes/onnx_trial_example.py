#!/usr/bin/env python3
"""Decide one text-dependent trial with an exported folder's ONNX model, without PyTorch.

Needs only ``onnxruntime``, ``numpy``, ``soundfile`` and ``pyyaml`` (``pip install onnxruntime
numpy soundfile pyyaml``) and the export folder; not torch, not SpeechBrain::

    python recipes/onnx_trial_example.py results/synthetic_demo/1986/export \
        --enrol e1.wav e2.wav e3.wav --test t.wav [--phrase 01] [--int8]

prints the verdict as JSON: the speaker and phrase scores, the calibrated LLR, the threshold,
the decision and the reason of a reject (the same decisions as the SpeechBrain folder:
``tests/test_export.py`` runs this script with torch made unimportable and compares). Audio
must be at the model's rate (16 kHz).

In this repository the folder is read as data by the repository's ``OnnxVerifier``
(``recipes/model/onnx_verifier.py``). Copied out alone, the script can use the folder's own
``tdsv_onnx_verifier.py`` (the same file, self-contained) with ``--trust_model_code``: that runs
the folder's code, so only for a folder from a source you trust.
"""

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> dict:
    """Parse the arguments, decide the trial, print and return its verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an export of recipes/export_model.py with model.onnx")
    parser.add_argument("--enrol", nargs="+", required=True, help="enrollment audio file(s)")
    parser.add_argument("--test", required=True, help="the test audio file")
    parser.add_argument("--phrase", help="the enrolled pass-phrase id (default: recognized)")
    parser.add_argument("--int8", action="store_true", help="use model.int8.onnx")
    parser.add_argument(
        "--trust_model_code", action="store_true",
        help="outside the repository: import the folder's tdsv_onnx_verifier.py (runs its code)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    verifier_class = onnx_verifier_class(args.folder, args.trust_model_code)
    verifier = verifier_class(args.folder, model="model.int8.onnx" if args.int8 else None)
    verdict = verifier.verify_trial(args.enrol, args.test, phrase=args.phrase)
    result = verdict._asdict()
    print(json.dumps(result))
    return result


def onnx_verifier_class(folder, trust_model_code: bool):
    """The repository's ``OnnxVerifier`` beside this script; else, if trusted, the folder's."""
    repository = Path(__file__).resolve().parents[1]
    if (repository / "recipes" / "model" / "onnx_verifier.py").is_file():
        sys.path.insert(0, str(repository))
        from recipes.model.onnx_verifier import OnnxVerifier  # reads the folder as data

        return OnnxVerifier
    if not trust_model_code:
        raise SystemExit(
            "error: this script is not in the repository, so only the folder's own "
            "tdsv_onnx_verifier.py can decide: add --trust_model_code to import it (it runs the "
            "folder's code: only for a folder from a source you trust)"
        )
    sys.path.insert(0, str(Path(folder).resolve()))  # the folder's own code, trusted
    from tdsv_onnx_verifier import OnnxVerifier

    return OnnxVerifier


if __name__ == "__main__":
    main()
