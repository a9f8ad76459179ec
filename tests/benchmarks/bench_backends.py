"""Extraction speed of an exported model's backends, one utterance at a time, as deployed.

For the demo's embedding model (phrase branch included, as the export ships it) with its tiny
WavLM and with a WavLM Base+ sized one (random weights), at 1 and 2 threads:

- PyTorch fp32, WavLM attention "eager" (transformers' own) and "sdpa" (``wavlm_attention``);
- PyTorch bf16 autocast (AMX on CPUs that have it), sdpa;
- onnxruntime fp32 (``model.onnx``) and int8 (``model.int8.onnx``, dynamic quantization), as
  ``recipes/onnx_export.py`` writes them (exported from the sdpa model).

Each setting embeds the same DeepMine-like utterances (1.5-5 s) one at a time; settings run in
interleaved rounds (a noisy machine slows all alike), and the table gives the real-time factor
(compute seconds per audio second, median over rounds), the speed-up over PyTorch fp32 eager at
the same thread count, and the largest distance of the embeddings from that one's (``1 - min
cosine``).

    python tests/benchmarks/bench_backends.py                       # both models, 1 and 2 threads
    python tests/benchmarks/bench_backends.py --models tiny --utterances 8 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from recipes.model.onnx_verifier import OnnxVerifier
from recipes.model.speaker_model import per_utterance, use_attention
from recipes.model.trial_decisions import cosine
from recipes.onnx_export import (
    ONNX_INT8_MODEL,
    ONNX_MODEL,
    speaker_decisions,
    write_onnx_models,
)
from tests.benchmarks import common

AUDIO = SimpleNamespace(sample_rate=16000, min_audio_seconds=0.3, max_eval_seconds=30.0)


def pytorch_embedder(model, attention: str, precision: str):
    """``wav [T] -> speaker embedding`` of the PyTorch model, as the SpeechBrain folder runs it."""
    dtype = {"bf16": torch.bfloat16}.get(precision)

    def embed(wav):
        """One utterance through the model (no grad; autocast for bf16)."""
        use_attention(model.encoder.model, attention)
        with torch.no_grad(), torch.autocast("cpu", dtype, enabled=dtype is not None):
            return per_utterance(model.embed_all(wav[None]))["speaker"][0].float().numpy()

    return embed


def onnx_embedder(folder: Path, file: str, threads: int, decisions: dict):
    """``wav [T] -> speaker embedding`` of an ONNX model on ``threads`` onnxruntime threads."""
    verifier = OnnxVerifier(folder, file, threads=threads, decisions=decisions, complete=False)
    return lambda wav: verifier.embed_waveform(wav.numpy())["speaker"]


def settings_for(model, folder: Path, threads: int, decisions: dict) -> dict:
    """The backends compared, by name, each a ``wav -> embedding`` function."""
    return {
        "pytorch fp32 eager": pytorch_embedder(model, "eager", "fp32"),
        "pytorch fp32 sdpa": pytorch_embedder(model, "sdpa", "fp32"),
        "pytorch bf16 sdpa": pytorch_embedder(model, "sdpa", "bf16"),
        "onnxruntime fp32": onnx_embedder(folder, ONNX_MODEL, threads, decisions),
        "onnxruntime int8": onnx_embedder(folder, ONNX_INT8_MODEL, threads, decisions),
    }


def timed_rounds(backends: dict, wavs, rounds: int, threads: int) -> dict:
    """Seconds per pass over ``wavs`` of each backend, interleaved rounds; and its embeddings."""
    torch.set_num_threads(threads)
    times = {name: [] for name in backends}
    embeddings = {name: [embed(w) for w in wavs[:1]] for name, embed in backends.items()}  # warm
    for _ in range(rounds):
        for name, embed in backends.items():
            start = time.perf_counter()
            embeddings[name] = [embed(wav) for wav in wavs]
            times[name].append(time.perf_counter() - start)
    return {"seconds": times, "embeddings": embeddings}


def min_cosine(a: list, b: list) -> float:
    """The smallest cosine between two lists of embeddings."""
    return min(cosine(x, y) for x, y in zip(a, b, strict=True))


def model_rows(name: str, model_dir, args, tmp: Path) -> list[dict]:
    """The rows of one model: every backend at every thread count."""
    model = common.demo_embedder(model_dir, name, tmp / name, wavlm_attention="sdpa")
    folder = tmp / f"{name}_onnx"
    folder.mkdir()
    started = time.perf_counter()
    write_onnx_models(folder, model, AUDIO)
    export_seconds = time.perf_counter() - started
    decisions = speaker_decisions(AUDIO, {})
    seconds = common.deepmine_lengths(args.utterances, seed=1)
    generator = torch.Generator().manual_seed(1)
    wavs = [torch.randn(int(s * 16000), generator=generator) * 0.1 for s in seconds]
    audio = float(seconds.sum())
    rows = []
    for threads in args.threads:
        timed = timed_rounds(
            settings_for(model, folder, threads, decisions), wavs, args.rounds, threads
        )
        base = statistics.median(timed["seconds"]["pytorch fp32 eager"])
        reference = timed["embeddings"]["pytorch fp32 eager"]
        for backend, values in timed["seconds"].items():
            median = statistics.median(values)
            rows.append({
                "model": name, "threads": threads, "backend": backend, "rtf": median / audio,
                "speedup": base / median, "rounds_s": values, "audio_s": audio,
                "one_minus_min_cosine": 1 - min_cosine(reference, timed["embeddings"][backend]),
                "onnx_export_s": export_seconds,
            })  # fmt: skip
    return rows


def main() -> None:
    """Run every model, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "base_plus"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench_backends.json")
    args = parser.parse_args()
    print("| model | threads | backend | RTF | speed-up vs PyTorch fp32 eager | 1 - min cosine |")
    print("|---|---:|---|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = common.model_dirs(tmp, args.models)
        for name in args.models:
            for row in model_rows(name, dirs[name], args, Path(tmp)):
                rows.append(row)
                print(
                    f"| {name} | {row['threads']} | {row['backend']} | {row['rtf']:.4f} | "
                    f"{row['speedup']:.2f}x | {row['one_minus_min_cosine']:.1e} |",
                    flush=True,
                )
    common.write_rows(args.json, rows)


if __name__ == "__main__":
    main()
