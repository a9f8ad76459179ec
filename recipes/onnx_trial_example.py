#!/usr/bin/env python3
"""Decide one text-dependent trial with an exported folder's ONNX model, without PyTorch.

Needs only ``onnxruntime``, ``numpy`` and ``soundfile`` (``pip install onnxruntime numpy
soundfile``) and the export folder; not this repository, not torch, not SpeechBrain::

    python recipes/onnx_trial_example.py results/synthetic_demo/1986/export \
        --enrol e1.wav e2.wav e3.wav --test t.wav [--phrase 01] [--int8]

prints the verdict as JSON: the speaker and phrase scores, the calibrated LLR, the threshold,
the decision and the reason of a reject. The folder's ``tdsv_onnx_verifier.py`` does the work
(the same decisions as the SpeechBrain folder: ``tests/test_export.py`` runs this script with
torch made unimportable and compares). Audio must be at the model's rate (16 kHz).
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
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(args.folder).resolve()))  # the folder's own code
    from tdsv_onnx_verifier import OnnxVerifier  # the folder is on the path only now

    verifier = OnnxVerifier(args.folder, model="model.int8.onnx" if args.int8 else None)
    verdict = verifier.verify_trial(args.enrol, args.test, phrase=args.phrase)
    result = verdict._asdict()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
