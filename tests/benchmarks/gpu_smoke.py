"""The one script to run when a GPU is lent: the user's real run, checked and timed in one go.

Sections (each is run even if an earlier one failed; the exit status says whether all passed):

1. ``versions``: torch, CUDA, transformers, SpeechBrain, the device.
2. ``group_norm``: the masked first-layer GroupNorm against ``F.group_norm`` under fp16 and
   bf16 autocast, 3 s and 20 s of amplitude 3 (finite, max abs error).
3. ``ddp``: ``torchrun --nproc_per_node=1`` (NCCL on a GPU, gloo on the CPU) builds
   ``hparams/wavlm_td.yaml`` with a WavLM Base+ sized random model (``do_normalize`` false,
   ``mask_time_prob`` 0.05, as the hub's Base+) and trains a frozen step then unfrozen steps
   with L2-SP: losses finite, GradScaler's scale.
4. ``training``: steps/s and peak memory at fp16 / bf16 / fp32, batch 32 x 3 s, gradient
   checkpointing off and on, WavLM attention sdpa and eager (``wavlm_attention``).
5. ``extraction``: utterances/s at batch 1 / 16 / 32 and the largest batch-vs-alone deviation.
6. ``end_to_end``: ``wavlm_td.yaml`` for 2 epochs (a frozen one first, ``--grad_accumulation_factor
   2``) on a small synthetic corpus, with the model given as a hub id resolved offline from a
   Hugging Face cache; then the export, reloaded on the CPU with no hub and one trial scored.

    python tests/benchmarks/gpu_smoke.py --json gpu_smoke.json                 # GPU, < 8 min
    python tests/benchmarks/gpu_smoke.py --device cpu --quick --json out.json  # CPU, small

``--quick`` runs every section small (the tiny WavLM, short batches): the test suite runs it
on the CPU so that this script works on the day a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import speechbrain as sb
import torch
import torch.nn.functional as F
import transformers
from speechbrain.dataio.batch import PaddedBatch
from transformers import WavLMConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from data_prep.synth_deepmine import SMALL_CORPUS, synthesize_corpus
from recipes.model.speaker_model import MaskedGroupNorm
from recipes.tiny_wavlm import TINY, save_to_hub_cache, save_wavlm, wavlm_base_plus_config
from recipes.train_speaker_embeddings import build_brain
from tests.benchmarks import common
from tests.benchmarks.bench_extract import min_cosine, time_extraction, utterances
from tests.helpers import free_port, load_yaml

#: The hub id the end-to-end run asks for (served from a local Hugging Face cache).
HUB_ID = "smoke/wavlm-base-plus-random"


def sizes(quick: bool) -> dict:
    """How big each section runs."""
    if quick:
        return {
            "model": "tiny",
            "hidden": 96,
            "batch": 4,
            "seconds": 1.0,
            "steps": 1,
            "warmup": 1,
            "utterances": 8,
            "batch_sizes": [1, 4],
            "epochs": 2,
        }
    return {
        "model": "base_plus",
        "hidden": 768,
        "batch": 32,
        "seconds": 3.0,
        "steps": 5,
        "warmup": 2,
        "utterances": 256,
        "batch_sizes": [1, 16, 32],
        "epochs": 2,
    }


def wavlm_config(quick: bool):
    """The model of every section: Base+ sized (or tiny), with Base+'s SpecAugment setting."""
    if quick:
        return WavLMConfig(**{**TINY, "mask_time_prob": 0.05})
    config = wavlm_base_plus_config()
    config.mask_time_prob = 0.05
    return config


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
def versions(args, context) -> dict:
    """Library versions and the device."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "transformers": transformers.__version__,
        "speechbrain": sb.__version__,
        "device": common.device_name(args.device),
        "bf16_supported": args.device == "cpu" or torch.cuda.is_bf16_supported(),
    }


@torch.no_grad()
def group_norm(args, context) -> list[dict]:
    """Masked GroupNorm vs ``F.group_norm`` under autocast (3 s and 20 s, amplitude 3)."""
    rows = []
    torch.manual_seed(0)
    norm = MaskedGroupNorm(512, 512).to(args.device)
    for seconds in (3, 20):
        frames = seconds * 16000 // 5
        x = 3 * torch.randn(2, 512, frames, device=args.device) + 1.5
        norm.valid_frames = torch.tensor([frames, frames // 2], device=args.device)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(torch.device(args.device).type, dtype=dtype):
                y = norm(x)
            error = max(
                float((y[r : r + 1, :, :n] - F.group_norm(x[r : r + 1, :, :n], 512)).abs().max())
                for r, n in enumerate((frames, frames // 2))
            )
            rows.append(
                {
                    "seconds": seconds,
                    "autocast": str(dtype).removeprefix("torch."),
                    "finite": bool(torch.isfinite(y).all()),
                    "max_abs_error": error,
                }
            )
    check(all(r["finite"] and r["max_abs_error"] < 1e-3 for r in rows), "group norm", rows)
    return rows


def ddp(args, context) -> dict:
    """``torchrun --nproc_per_node=1`` training steps of ``wavlm_td.yaml`` (``worker_ddp``)."""
    out = context["tmp"] / "ddp.json"
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        f"--master_port={free_port()}",
        __file__,
        "--worker",
        "ddp",
        "--device",
        args.device,
        "--model_dir",
        context["model_dir"],
        "--out",
        str(out),
        "--backend",
        backend,
        *(["--quick"] if args.quick else []),
    ]
    run(command, "ddp worker")
    report = json.loads(out.read_text())
    losses = report["frozen_losses"] + report["unfrozen_losses"]
    check(all(map(finite, losses)) and report["wavlm_moved"], "ddp", report)
    return report


def worker_ddp(args) -> None:
    """The torchrun child: a frozen step, then unfrozen steps with L2-SP; a JSON report."""
    size = sizes(args.quick)
    sb.utils.distributed.ddp_init_group({"distributed_backend": args.backend})
    precision = "fp16" if args.device.startswith("cuda") else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        run_opts = {
            "device": device_of_rank(args.device),
            "precision": precision,
            "distributed_backend": args.backend,
        }
        brain = real_brain(args.model_dir, size, Path(tmp), run_opts)
        brain.on_fit_start()
        report = {"precision": precision, "backend": args.backend}
        for epoch, steps, name in ((1, 1, "frozen"), (2, 3, "unfrozen")):
            brain.hparams.epoch_counter.current = epoch
            brain.on_stage_start(sb.Stage.TRAIN, epoch)
            before = [p.detach().clone() for p in brain.wavlm_weights[:4]]
            report[f"{name}_losses"] = [
                float(brain.fit_batch(fixed_batch(size["batch"], size["seconds"])))
                for _ in range(steps)
            ]
            moved = any(
                bool((p != b).any()) for p, b in zip(brain.wavlm_weights, before, strict=False)
            )
            report["wavlm_moved" if name == "unfrozen" else "wavlm_moved_frozen"] = moved
        report["grad_scale"] = (
            float(brain.scaler.get_scale()) if brain.scaler.is_enabled() else None
        )
        report["l2sp"] = float(brain.l2sp())
        spec_embed = brain.model().encoder.model.masked_spec_embed
        report["masked_spec_embed_trains"] = spec_embed.requires_grad
    if sb.utils.distributed.if_main_process():
        Path(args.out).write_text(json.dumps(report))


def training(args, context) -> list[dict]:
    """Training steps/s and peak memory per precision, gradient checkpointing off and on.

    Without checkpointing, both WavLM attention paths (``wavlm_attention``: sdpa, eager).
    """
    size, rows = sizes(args.quick), []
    precisions = ["fp16", "bf16", "fp32"] if args.device.startswith("cuda") else ["bf16", "fp32"]
    for precision in precisions:
        for checkpointing, attention in ((False, "sdpa"), (False, "eager"), (True, "sdpa")):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            run_opts = {"device": device_of_rank(args.device), "precision": precision}
            brain = real_brain(
                context["model_dir"],
                size,
                context["tmp"] / "train",
                run_opts,
                gradient_checkpointing=checkpointing,
                wavlm_attention=attention,
            )
            brain.init_optimizers()
            brain.hparams.epoch_counter.current = 2  # past the frozen warm-up
            brain.modules.train()
            batch = fixed_batch(size["batch"], size["seconds"])
            for _ in range(size["warmup"]):
                brain.fit_batch(batch)
            common.synchronize(args.device)
            start = time.perf_counter()
            losses = [float(brain.fit_batch(batch)) for _ in range(size["steps"])]
            elapsed = time.perf_counter() - start
            rows.append(
                {
                    "precision": precision,
                    "gradient_checkpointing": checkpointing,
                    "attention": attention,
                    "batch": f"{size['batch']} x {size['seconds']} s",
                    "steps_per_s": size["steps"] / elapsed,
                    "peak_mb": common.peak_memory_mb(args.device),
                    "finite": all(map(finite, losses)),
                }
            )
            del brain
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    check(all(r["finite"] for r in rows), "training", rows)
    return rows


def extraction(args, context) -> list[dict]:
    """Utterances/s of the recipe's batched extraction, and its deviation from one at a time."""
    size, rows = sizes(args.quick), []
    dataset, audio = utterances(size["utterances"])
    embedder = common.demo_embedder(context["model_dir"], size["model"], context["tmp"] / "x")
    precisions = ["fp16", "fp32"] if args.device.startswith("cuda") else ["bf16", "fp32"]
    for precision in precisions:
        alone = None
        for batch_size in size["batch_sizes"]:
            seconds, table = time_extraction(embedder, dataset, batch_size, args.device, precision)
            alone = table if batch_size == 1 else alone
            rows.append(
                {
                    "precision": precision,
                    "batch_size": batch_size,
                    "utts_per_s": len(dataset) / seconds,
                    "rtf": seconds / audio,
                    "deviation": 1.0 - min_cosine(alone, table),
                }
            )
    return rows


def end_to_end(args, context) -> dict:
    """``wavlm_td.yaml``: 2 epochs (frozen first), accumulation 2, a hub id; export; reload."""
    size, tmp = sizes(args.quick), context["tmp"]
    corpus = Path(args.corpus) if args.corpus else synthetic_corpus(tmp / "corpus")
    cache = tmp / "hf_cache"
    save_to_hub_cache(cache, HUB_ID, wavlm_config(args.quick), do_normalize=False)
    recipe_args = [
        str(common.ROOT / "hparams" / "wavlm_td.yaml"),
        "--data_folder",
        str(corpus),
        "--output_folder",
        str(tmp / "e2e"),
        "--valid_speakers",
        "2",
        "--wavlm_source",
        HUB_ID,
        "--wavlm_hidden_size",
        str(size["hidden"]),
        "--number_of_epochs",
        str(size["epochs"]),
        "--grad_accumulation_factor",
        "2",
        "--device",
        device_of_rank(args.device),
        "--noprogressbar",
        "--num_workers",
        "2",
    ]
    if args.quick:
        recipe_args += ["--batch_size", "8", "--crop_seconds", "1.0", "--emb_dim", "64"]
    if not args.device.startswith("cuda"):  # SpeechBrain refuses fp16 on the CPU
        recipe_args += ["--precision", "fp32", "--eval_precision", "fp32"]
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    start = time.perf_counter()
    train_log = run(
        [sys.executable, "recipes/train_speaker_embeddings.py", *recipe_args],
        "training",
        env=offline,
    )
    trained_s = time.perf_counter() - start
    export_args = [  # a step on the run: its other settings come from the run's record
        str(common.ROOT / "hparams" / "export.yaml"), "--output_folder", str(tmp / "e2e"),
        "--device", device_of_rank(args.device), "--noprogressbar",
    ]  # fmt: skip
    export_log = run(
        [sys.executable, "recipes/export_model.py", *export_args], "export", env=offline
    )
    exported_s = time.perf_counter() - start - trained_s
    folder = tmp / "e2e" / "export"
    no_hub = {**offline, "HF_HUB_CACHE": str(tmp / "empty_cache"), "CUDA_VISIBLE_DEVICES": ""}
    reload_log = run([sys.executable, "-c", RELOAD, str(folder), str(corpus)], "reload", env=no_hub)
    derived = [line for line in train_log.splitlines() if "total_steps derived" in line]
    valid_report = tmp / "e2e" / "verification_valid.json"
    facts = json.loads((folder / "export.json").read_text())
    report = {
        "train_s": trained_s,
        "export_s": exported_s,
        "total_steps_line": derived[-1].split("total_steps derived: ")[-1] if derived else None,
        "frozen_then_unfrozen": "WavLM frozen" in train_log and "WavLM unfrozen" in train_log,
        "valid_pooled": json.loads(valid_report.read_text())["conditions"]["pooled"],
        "export_checks": facts["checks"],
        "reloaded_on_cpu": json.loads(reload_log.strip().splitlines()[-1]),
        "exported": [line for line in export_log.splitlines() if line.startswith("exported ")][-1:],
    }
    check(report["frozen_then_unfrozen"] and report["total_steps_line"], "end to end", report)
    return report


#: Loads an export on the CPU with no hub and scores its first validation trial (a subprocess).
RELOAD = """
import json, sys
from pathlib import Path
import pandas as pd
from recipes.evaluation.pretrained import load_verifier

folder, corpus = Path(sys.argv[1]), sys.argv[2]
prep = folder.parent / "prep"
models = pd.read_csv(prep / "valid_enrol.csv", dtype=str)
trials = pd.read_csv(prep / "valid_trials.csv", dtype=str)
wavs = pd.concat([pd.read_csv(prep / f"valid_{n}.csv", dtype=str) for n in ("enrol_utts", "test")])
wav = wavs.set_index("ID")["wav"].str.replace("$data_root", corpus, regex=False)
trial = trials.iloc[0]
model = models.set_index("model_id").loc[trial["model_id"]]
verifier = load_verifier(folder, {"device": "cpu"})
# The pass-phrase named, as an application that enrolled it knows it: a model trained for
# seconds need not recognize the same phrase in each enrollment file.
verdict = verifier.verify_trial(
    [wav[i] for i in model["enrol_ids"].split()], wav[trial["test_id"]], phrase=model["phrase_id"]
)
print(json.dumps({"speaker_score": verdict.speaker_score, "score": verdict.score,
                  "accept": bool(verdict.accept), "reason": verdict.reason}))
"""

SECTIONS = {
    "versions": versions,
    "group_norm": group_norm,
    "ddp": ddp,
    "training": training,
    "extraction": extraction,
    "end_to_end": end_to_end,
}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
class SmokeFailure(AssertionError):
    """A section ran but its numbers are wrong."""


def check(ok, what: str, details) -> None:
    """Fail the section with its numbers when ``ok`` is false."""
    if not ok:
        raise SmokeFailure(f"{what}: {json.dumps(details, default=str)[:2000]}")


def finite(value: float) -> bool:
    """True for a finite number."""
    return value == value and abs(value) != float("inf")


def real_brain(model_dir, size: dict, folder: Path, run_opts: dict, **overrides):
    """``SpeakerBrain`` as ``hparams/wavlm_td.yaml`` wires it, with the given WavLM folder."""
    hparams = load_yaml(
        "wavlm_td.yaml",
        {
            "data_folder": str(folder),
            "output_folder": str(folder),
            "wavlm_source": model_dir,
            "wavlm_hidden_size": size["hidden"],
            "noise_csv": None,
            "augment": False,
            "warmup_steps": 1,
            **overrides,
        },
    )
    run_opts = {"eval_precision": run_opts["precision"], "noprogressbar": True, **run_opts}
    return build_brain(hparams, run_opts, n_classes=50, n_phrases=10)


def fixed_batch(batch_size: int, seconds: float):
    """A training batch of equal-length random utterances (training crops are all one length)."""
    examples = [
        {
            "id": f"u{i}",
            "sig": 0.1 * torch.randn(int(seconds * 16000)),
            "class_encoded": torch.tensor([i % 50]),
            "phrase_encoded": torch.tensor([i % 10]),
        }
        for i in range(batch_size)
    ]
    return PaddedBatch(examples)


def device_of_rank(device: str) -> str:
    """``cuda`` as the process's own GPU (``cuda:LOCAL_RANK``); ``cpu`` as it is."""
    if device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def run(command: list[str], what: str, env=None) -> str:
    """Run a command from the repository; its output, or a failure with its tail."""
    env = {**(env or os.environ), "PYTHONPATH": str(common.ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=common.ROOT, env=env)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SmokeFailure(f"{what} exited {result.returncode}:\n{output[-4000:]}")
    return output


def synthetic_corpus(folder: Path) -> Path:
    """A small synthetic DeepMine-layout corpus (the tests' ``SMALL_CORPUS``)."""
    return synthesize_corpus(folder, jobs=os.cpu_count() or 1, **SMALL_CORPUS)


def print_table(results: dict) -> None:
    """A short table of what each section found."""
    print("| section | status | seconds | summary |\n|---|---|---:|---|")
    for name, result in results.items():
        summary = json.dumps(result.get("result"), default=str)
        if len(summary) > 160:
            summary = summary[:157] + "..."
        print(f"| {name} | {result['status']} | {result['seconds']:.1f} | {summary} |")


def main() -> int:
    """Run every section (or ``--sections``); write the JSON; 1 if any section failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="every section small (CPU test)")
    parser.add_argument("--json", default="gpu_smoke.json")
    parser.add_argument("--sections", nargs="*", choices=sorted(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--corpus", help="an existing synthetic corpus (default: make one)")
    parser.add_argument("--worker", choices=["ddp"], help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ddp":
        worker_ddp(args)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        quick = args.quick
        model_dir = save_wavlm(tmp / "wavlm", wavlm_config(quick), do_normalize=False)
        context = {"tmp": tmp, "model_dir": model_dir}
        for name in args.sections:
            start = time.perf_counter()
            try:
                results[name] = {"status": "ok", "result": SECTIONS[name](args, context)}
            except Exception as error:  # every section runs: one GPU lease, all the answers
                results[name] = {
                    "status": "FAILED",
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            results[name]["seconds"] = time.perf_counter() - start
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print_table(results)
    failed = [name for name, r in results.items() if r["status"] != "ok"]
    for name in failed:
        print(f"\n{name} FAILED: {results[name]['error']}\n{results[name]['traceback']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
