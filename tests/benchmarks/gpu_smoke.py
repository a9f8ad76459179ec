"""The one script to run when a GPU is lent: the user's real run, checked and timed.

The lent machine allows 10 minutes a command and 15 in all, so the check is two calls
(``--call``), each with a budget of seconds it keeps (``CALL_BUDGET_S``):

- ``core``: ``versions`` (torch, CUDA, transformers, SpeechBrain, the device; bf16 without
  emulation), ``group_norm`` (the masked first-layer GroupNorm against ``F.group_norm`` under
  fp16 / bf16 autocast with TF32 on, 3 s and 20 s of amplitude 3), ``ddp`` (``torchrun`` with
  NCCL: ``hparams/wavlm_td.yaml`` with the hub's WavLM Base+ config, a frozen step then unfrozen
  steps with L2-SP, and WavLM Large's config with ``l2sp_weight`` 0 and no
  ``find_unused_parameters``), ``training`` (steps/s and peak memory per precision, gradient
  checkpointing off and on, sdpa and eager attention; Base+ and Large, batch 32 x 3 s) and
  ``extraction`` (utterances/s at batch 1 / 16 / 32, the batch-vs-alone deviation).
- ``end_to_end``: ``wavlm_td.yaml`` for 2 epochs (a frozen one first, accumulation 2) on a small
  synthetic corpus, the model given as a hub id resolved offline from a Hugging Face cache; the
  export (ONNX and int8 included), reloaded on the CPU with no hub and one trial scored.

A section starts only if the call's budget still holds what it needs (``SECTION_S``); the JSON
is rewritten (atomically) when a section starts and when it ends, so a call stopped at its
limit still returns every finished section and names the one it was in.

    python tests/benchmarks/gpu_smoke.py --call core --json core.json          # GPU
    python tests/benchmarks/gpu_smoke.py --call end_to_end --json e2e.json     # GPU
    python tests/benchmarks/gpu_smoke.py --device cpu --quick --json out.json  # CPU, small

On the lent machine, ``tests/benchmarks/device_kit.py --run CALL`` installs the packages its
image lacks and runs this (docs/performance.md). ``--quick`` runs every section small (tiny
models, short batches): the test suite runs it on the CPU so that this script works the day a
GPU is lent.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import speechbrain as sb
import torch
import torch.nn.functional as F
import transformers
from speechbrain.dataio.batch import PaddedBatch
from transformers import WavLMConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from data_prep.synth_deepmine import SMALL_CORPUS, synthesize_corpus
from recipes.experiment import native_bf16
from recipes.model.speaker_model import MaskedGroupNorm
from recipes.tiny_wavlm import (
    TINY,
    save_to_hub_cache,
    save_wavlm,
    wavlm_base_plus_config,
    wavlm_large_config,
)
from recipes.train_speaker_embeddings import build_brain
from tests.benchmarks import common
from tests.benchmarks.bench_extract import min_cosine, time_extraction, utterances
from tests.helpers import free_port, load_yaml

#: The hub id the end-to-end run asks for (served from a local Hugging Face cache).
HUB_ID = "smoke/wavlm-base-plus-random"


#: The calls of the GPU check: each ends well inside the lent machine's 10 minutes a command.
CALLS = {
    "core": ["versions", "group_norm", "ddp", "training", "extraction"],
    "end_to_end": ["versions", "end_to_end"],
}

#: Seconds each call keeps to (one H100-class GPU; ``--quick`` on 2 CPU cores). The lent
#: machine's 15 minutes hold a start (1-2 min), both calls with their installs and transfers,
#: and a margin: a section that would not fit in what is left is skipped, and named so.
CALL_BUDGET_S = {"core": 300, "end_to_end": 330}
QUICK_CALL_BUDGET_S = {"core": 300, "end_to_end": 600}

#: Seconds a section may need (docs/performance.md, "GPU check": the CPU quick run's sections
#: scaled to Base+ and Large on one GPU); it starts only with that much left of its call.
SECTION_S = {
    "versions": 5, "group_norm": 15, "ddp": 90, "training": 150, "extraction": 40,
    "end_to_end": 300,
}  # fmt: skip
QUICK_SECTION_S = {
    "versions": 5, "group_norm": 15, "ddp": 90, "training": 90, "extraction": 30,
    "end_to_end": 540,
}  # fmt: skip


def sizes(quick: bool) -> dict:
    """How big each section runs."""
    if quick:
        return {
            "batch": 4,
            "seconds": 1.0,
            "steps": 1,
            "warmup": 1,
            "utterances": 8,
            "batch_sizes": [1, 4],
            "epochs": 2,
        }
    return {
        "batch": 32,
        "seconds": 3.0,
        "steps": 5,
        "warmup": 2,
        "utterances": 256,
        "batch_sizes": [1, 16, 32],
        "epochs": 2,
    }


class Model(NamedTuple):
    """A WavLM the sections build: its config and the recipe's ``wavlm_hidden_size``."""

    config: WavLMConfig
    hidden: int


def models(quick: bool) -> dict[str, Model]:
    """``base_plus`` and ``large``: the hub's configs, or (``--quick``) their small stand-ins.

    Quick: the tiny demo WavLM, and Large's layers, states and norms at the tiny width.
    """
    if quick:
        narrow = {k: TINY[k] for k in ("hidden_size", "intermediate_size", "conv_dim")}
        return {
            "base_plus": Model(
                WavLMConfig(**{**TINY, "mask_time_prob": 0.05}), TINY["hidden_size"]
            ),
            "large": Model(wavlm_large_config(**narrow, num_conv_pos_embeddings=16), 96),
        }
    return {
        "base_plus": Model(wavlm_base_plus_config(), 768),
        "large": Model(wavlm_large_config(), 1024),
    }


class Budget:
    """The seconds left of a call, and whether a section's expected time still fits."""

    def __init__(self, seconds: float, needs: dict):
        self.deadline, self.needs = time.monotonic() + seconds, needs

    def left(self) -> float:
        """Seconds left (never below 0)."""
        return max(0.0, self.deadline - time.monotonic())

    def refusal(self, section: str) -> str | None:
        """Why ``section`` must not start (None: it fits)."""
        need, left = self.needs[section], self.left()
        if need <= left:
            return None
        return f"skipped: {left:.0f} s left of the call's budget, it needs up to {need} s"


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
def versions(args, context) -> dict:
    """Library versions and the device; bf16 as the hardware runs it (no emulation)."""
    on_gpu = args.device.startswith("cuda")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "transformers": transformers.__version__,
        "speechbrain": sb.__version__,
        "device": common.device_name(args.device),
        "bf16_native": not on_gpu or native_bf16(),
        "tf32_allowed": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
        "packages_from": [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p],
    }


@torch.no_grad()
def group_norm(args, context) -> list[dict]:
    """Masked GroupNorm vs ``F.group_norm`` (fp64) under autocast, TF32 on (3 s and 20 s)."""
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
                float(
                    (y[r : r + 1, :, :n] - F.group_norm(x[r : r + 1, :, :n].double(), 512))
                    .abs()
                    .max()
                )
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
    check(all(r["finite"] and r["max_abs_error"] < 1e-4 for r in rows), "group norm", rows)
    return rows


def ddp(args, context) -> dict:
    """``torchrun --nproc_per_node=1`` training steps of ``wavlm_td.yaml`` (``worker_ddp``)."""
    out = context["tmp"] / "ddp.json"
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
        f"--master_port={free_port()}", __file__, "--worker", "ddp", "--device", args.device,
        "--model_dirs", json.dumps(context["model_dirs"]), "--out", str(out),
        "--backend", backend, *(["--quick"] if args.quick else []),
    ]  # fmt: skip
    run(command, "ddp worker", timeout=context["budget"].left())
    report = json.loads(out.read_text())
    for name, model in report.items():
        losses = model["frozen_losses"] + model["unfrozen_losses"]
        scale = model["grad_scale"]
        sound = all(map(finite, losses)) and (scale is None or (finite(scale) and scale >= 1))
        # fp16's GradScaler skips steps whose gradients overflow (its first ones, often): the
        # check is that losses and the scale are finite, not that a skipped step moved weights.
        moved = model["wavlm_moved"] or model["precision"] == "fp16"
        check(sound and moved and not model["wavlm_moved_frozen"], f"ddp {name}", model)
    return report


def worker_ddp(args) -> None:
    """The torchrun child: per model, a frozen step, then unfrozen steps; a JSON report.

    Base+ with the YAML's L2-SP; Large with ``l2sp_weight`` 0, so that a weight the forward
    leaves out (its final LayerNorm, under transformers 5) fails DDP's reducer.
    """
    size = sizes(args.quick)
    sb.utils.distributed.ddp_init_group({"distributed_backend": args.backend})
    precision = "fp16" if args.device.startswith("cuda") else "fp32"
    hidden = {name: model.hidden for name, model in models(args.quick).items()}
    report = {}
    for name, model_dir in json.loads(args.model_dirs).items():
        overrides = {"l2sp_weight": 0.0} if name == "large" else {}
        with tempfile.TemporaryDirectory() as tmp:
            run_opts = {
                "device": device_of_rank(args.device),
                "precision": precision,
                "distributed_backend": args.backend,
            }
            brain = real_brain(model_dir, hidden[name], Path(tmp), run_opts, **overrides)
            report[name] = ddp_steps(brain, size)
            report[name]["precision"] = precision
            del brain
            gc.collect()
    if sb.utils.distributed.if_main_process():
        Path(args.out).write_text(json.dumps(report))
    torch.distributed.destroy_process_group()  # before exit, as torch asks


def ddp_steps(brain, size: dict) -> dict:
    """A frozen step, then 3 unfrozen ones, as ``fit`` runs them; losses and what moved."""
    brain.on_fit_start()
    report = {"backend": torch.distributed.get_backend()}
    for epoch, steps, name in ((1, 1, "frozen"), (2, 3, "unfrozen")):
        brain.hparams.epoch_counter.current = epoch
        brain.on_stage_start(sb.Stage.TRAIN, epoch)
        before = [p.detach().clone() for p in brain.wavlm_weights]
        report[f"{name}_losses"] = [
            float(brain.fit_batch(fixed_batch(size["batch"], size["seconds"])))
            for _ in range(steps)
        ]
        moved = any(bool((p != b).any()) for p, b in zip(brain.wavlm_weights, before, strict=True))
        report["wavlm_moved" if name == "unfrozen" else "wavlm_moved_frozen"] = moved
    report["grad_scale"] = float(brain.scaler.get_scale()) if brain.scaler.is_enabled() else None
    report["l2sp"] = None if brain.l2sp is None else float(brain.l2sp())
    report["masked_spec_embed_trains"] = brain.model().encoder.model.masked_spec_embed.requires_grad
    return report


#: (model, precisions or None for all, gradient checkpointing, attention) of the training rows:
#: Base+ in every setting, Large (3x the weights) in the two that fit its memory best.
TRAINING_ROWS = [
    ("base_plus", None, False, "sdpa"),
    ("base_plus", None, False, "eager"),
    ("base_plus", None, True, "sdpa"),
    ("large", ("bf16", "fp16"), False, "sdpa"),
    ("large", ("bf16", "fp16"), True, "sdpa"),
]


def training(args, context) -> list[dict]:
    """Training steps/s and peak memory per model, precision, checkpointing and attention.

    Rows stop where the call's budget ends (the last row says so), not midway through one.
    """
    rows, budget = [], context["budget"]
    on_gpu = args.device.startswith("cuda")
    hidden = {name: model.hidden for name, model in models(args.quick).items()}
    for model, wanted, checkpointing, attention in TRAINING_ROWS:
        for precision in ["fp16", "bf16", "fp32"] if on_gpu else ["bf16", "fp32"]:
            if wanted is not None and precision not in wanted:
                continue
            if budget.left() < 20:
                rows.append({"stopped": f"{budget.left():.0f} s left of the call's budget"})
                return rows
            rows.append(training_row(args, context, model, hidden[model], precision,
                                     checkpointing=checkpointing, attention=attention))  # fmt: skip
    check(all(r.get("finite", True) for r in rows), "training", rows)
    return rows


def training_row(args, context, model: str, hidden: int, precision: str, **settings) -> dict:
    """One training row: warm-up steps, then timed steps of one fixed batch."""
    size = sizes(args.quick)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run_opts = {"device": device_of_rank(args.device), "precision": precision}
    brain = real_brain(
        context["model_dirs"][model], hidden, context["tmp"] / "train", run_opts,
        gradient_checkpointing=settings["checkpointing"], wavlm_attention=settings["attention"],
    )  # fmt: skip
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
    row = {
        "model": model,
        "precision": precision,
        "gradient_checkpointing": settings["checkpointing"],
        "attention": settings["attention"],
        "batch": f"{size['batch']} x {size['seconds']} s",
        "steps_per_s": size["steps"] / elapsed,
        "peak_mb": common.peak_memory_mb(args.device),
        "finite": all(map(finite, losses)),
    }
    del brain, batch
    released(args.device)
    return row


def released(device: str) -> None:
    """Free the last model's memory, so that the next row's peak is its own.

    SpeechBrain's checkpointer holds the model in a reference cycle: ``del`` alone frees nothing
    until the cycle collector runs.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def extraction(args, context) -> list[dict]:
    """Utterances/s of the recipe's batched extraction, and its deviation from one at a time."""
    size, rows = sizes(args.quick), []
    dataset, audio = utterances(size["utterances"])
    hidden = models(args.quick)["base_plus"].hidden
    embedder = common.demo_embedder(
        context["model_dirs"]["base_plus"], "base_plus", context["tmp"] / "x",
        wavlm_hidden_size=hidden,
    )  # fmt: skip
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
    size, tmp, budget = sizes(args.quick), context["tmp"], context["budget"]
    corpus = Path(args.corpus) if args.corpus else synthetic_corpus(tmp / "corpus")
    cache = tmp / "hf_cache"
    base_plus = models(args.quick)["base_plus"]
    save_to_hub_cache(cache, HUB_ID, base_plus.config, do_normalize=False)
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
        str(base_plus.hidden),
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
        timeout=budget.left(),
    )
    trained_s = time.perf_counter() - start
    export_args = [  # a step on the run: its other settings come from the run's record
        str(common.ROOT / "hparams" / "export.yaml"), "--output_folder", str(tmp / "e2e"),
        "--device", device_of_rank(args.device), "--noprogressbar",
    ]  # fmt: skip
    export_log = run(
        [sys.executable, "recipes/export_model.py", *export_args], "export", env=offline,
        timeout=budget.left(),
    )  # fmt: skip
    exported_s = time.perf_counter() - start - trained_s
    folder = tmp / "e2e" / "export"
    no_hub = {**offline, "HF_HUB_CACHE": str(tmp / "empty_cache"), "CUDA_VISIBLE_DEVICES": ""}
    reload_log = run(
        [sys.executable, "-c", RELOAD, str(folder), str(corpus)], "reload", env=no_hub,
        timeout=budget.left(),
    )  # fmt: skip
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


def real_brain(model_dir, hidden: int, folder: Path, run_opts: dict, **overrides):
    """``SpeakerBrain`` as ``hparams/wavlm_td.yaml`` wires it, with the given WavLM folder."""
    hparams = load_yaml(
        "wavlm_td.yaml",
        {
            "data_folder": str(folder),
            "output_folder": str(folder),
            "wavlm_source": model_dir,
            "wavlm_hidden_size": hidden,
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


def run(command: list[str], what: str, env=None, timeout: float | None = None) -> str:
    """Run a command from the repository; its output, or a failure with its tail.

    The repository goes first on ``PYTHONPATH``, before what is there: on the lent machine the
    packages its image lacks are reached that way (``device_kit.py``).
    """
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.ROOT), env.get("PYTHONPATH")]))
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=common.ROOT, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired as error:
        tail = (error.stdout or b"")[-4000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise SmokeFailure(
            f"{what} ran past the call's budget ({timeout:.0f} s):\n{tail}"
        ) from None
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
        print(f"| {name} | {result['status']} | {result.get('seconds', 0):.1f} | {summary} |")


def write_json(path: Path, results: dict) -> None:
    """``results`` to ``path`` in one rename: a call stopped at its limit leaves a whole file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(results, indent=1, default=str))
    os.replace(partial, path)


def run_sections(args, names: list[str], context: dict, out: Path) -> dict:
    """Run ``names`` in order within the call's budget; every section's result, as it ends."""
    results = {}
    for name in names:
        refusal = context["budget"].refusal(name)
        if refusal is not None:
            results[name] = {"status": refusal}
            write_json(out, results)
            continue
        results[name] = {"status": "running"}  # what a call stopped at its limit was doing
        write_json(out, results)
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
        write_json(out, results)
    return results


def main() -> int:
    """Run a call's sections (every section without ``--call``); write the JSON; 1 on a failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="every section small (CPU test)")
    parser.add_argument("--json", default="gpu_smoke.json")
    parser.add_argument("--call", choices=sorted(CALLS), help="one call's sections and budget")
    parser.add_argument("--sections", nargs="*", choices=sorted(SECTIONS))
    parser.add_argument(
        "--budget_s", type=float, help="the call's seconds (default: CALL_BUDGET_S)"
    )
    parser.add_argument("--corpus", help="an existing synthetic corpus (default: make one)")
    parser.add_argument("--worker", choices=["ddp"], help=argparse.SUPPRESS)
    parser.add_argument("--model_dirs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ddp":
        worker_ddp(args)
        return 0
    names = args.sections or (CALLS[args.call] if args.call else list(SECTIONS))
    budgets = QUICK_CALL_BUDGET_S if args.quick else CALL_BUDGET_S
    seconds = args.budget_s or (budgets[args.call] if args.call else sum(budgets.values()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        budget = Budget(seconds, QUICK_SECTION_S if args.quick else SECTION_S)
        trains_large = {"ddp", "training"} & set(names)
        wanted = ["base_plus", "large"] if trains_large else ["base_plus"]
        model_dirs = {  # Large only where a section trains it (1.2 GB of random weights)
            name: save_wavlm(tmp / name, model.config, do_normalize=name == "large")
            for name, model in models(args.quick).items() if name in wanted
        }  # fmt: skip
        context = {"tmp": tmp, "model_dirs": model_dirs, "budget": budget}
        results = run_sections(args, names, context, Path(args.json))
    print_table(results)
    failed = [name for name, r in results.items() if r["status"] != "ok"]
    for name in failed:
        error = results[name].get("error", results[name]["status"])
        print(f"\n{name} FAILED: {error}\n{results[name].get('traceback', '')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
