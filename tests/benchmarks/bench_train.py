"""Training-step speed of ``SpeakerBrain``: steps/s, utterances/s, audio seconds/s, peak memory.

Runs real ``fit_batch`` calls (forward, margin loss, backward, both optimizers) of the recipe as
``hparams/synthetic_demo.yaml`` wires it, on synthetic batches, for:

- the demo's tiny WavLM, and a WavLM Base+ sized model (same ``WavLMConfig`` as
  ``microsoft/wavlm-base-plus``, random weights);
- each precision the device supports (CPU: fp32, bf16; CUDA: fp32, fp16, bf16);
- the speaker head (``--heads``: x-vector, ECAPA-TDNN, MHFA; the demo YAML's sizes);
- the CNN frozen as each model's YAML has it (Base+ as ``wavlm_td.yaml``: frozen), or as asked;
- gradient checkpointing off / on;
- utterance lengths drawn like DeepMine's (1.5-5 s) batched at random (padding) or sorted by length
  (bucketing): "audio s/s" counts real audio only, so padding shows up as lost throughput.

One table row per setting; all rows also go to a JSON file. Data loading is not included.

    python tests/benchmarks/bench_train.py                       # CPU: short runs
    python tests/benchmarks/bench_train.py --models base_plus --steps 20 --batch_size 16  # GPU
    python tests/benchmarks/bench_train.py --models base_plus --precisions fp32 \
        --grad_checkpointing off --bucketing on        # one row (the options select the grid)
    python tests/benchmarks/bench_train.py --implementations recipe transformers --rounds 2 \
        --precisions fp32 --grad_checkpointing off --bucketing on    # against WavLMForXVector
    python tests/benchmarks/bench_train.py --models base_plus --implementations recipe \
        transformers --attention sdpa eager --rounds 3 --precisions fp32 \
        --grad_checkpointing off --bucketing on     # the attention paths and WavLMForXVector
    python tests/benchmarks/bench_train.py --heads xvector ecapa mhfa --rounds 2 \
        --precisions fp32 --grad_checkpointing off --bucketing on    # the three heads
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from tests.benchmarks.common import (
    device_name,
    model_dirs,
    peak_memory_mb,
    synchronize,
    training_batches,
    training_brain,
    write_rows,
)


def frozen_cnn(model: str, choice: str) -> bool:
    """Whether the CNN is frozen: as the model's YAML has it (``auto``), or as asked."""
    if choice == "auto":  # wavlm_td.yaml freezes the pretrained CNN; the demo trains its own
        return model == "base_plus"
    return choice == "yes"


def run_setting(model_dir, model, precision, checkpointing, bucketing, recipe, args, tmp) -> dict:
    """Time ``args.steps`` training steps of the recipe after ``args.warmup`` untimed ones.

    ``recipe``: ``(head, attention)``. Beside ``transformers`` rows, the recipe trains the speaker
    model alone (no phrase branch), as ``WavLMForXVector`` does.
    """
    head, attention = recipe
    run_opts = {"device": args.device, "precision": precision}
    freeze_cnn = frozen_cnn(model, args.freeze_cnn)
    speaker_only = "transformers" in args.implementations
    overrides = {"phrase_branch": False, "fusion": "none"} if speaker_only else {}
    brain = training_brain(
        model_dir,
        model,
        tmp,
        run_opts,
        gradient_checkpointing=checkpointing,
        freeze_cnn=freeze_cnn,
        augment=False,
        head_type=head,
        wavlm_attention=attention,
        **overrides,
    )
    head_params = trainable_parameters(brain.model().head)

    def step(batch):
        brain.step += 1
        brain.fit_batch(batch)

    return timed_steps(
        step, args, bucketing,
        {"implementation": f"recipe ({attention})", "model": model, "head": head,
         "head_params": head_params,
         "trainable_params": trainable_parameters(brain.modules), "precision": precision,
         "frozen_cnn": freeze_cnn, "grad_checkpointing": checkpointing},
    )  # fmt: skip


def trainable_parameters(module: torch.nn.Module) -> int:
    """The number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


#: The demo's x-vector head sizes, in ``WavLMForXVector``'s configuration names.
HF_HEAD = {
    "tdnn_dim": [256, 256, 256, 256, 768],
    "tdnn_kernel": [5, 3, 3, 1, 1],
    "tdnn_dilation": [1, 2, 3, 1, 1],
    "xvector_output_dim": 192,
    "num_labels": 50,
}


def transformers_trainer(model_dir, freeze_cnn: bool, checkpointing: bool, device):
    """``transformers.WavLMForXVector`` and a plain AdamW on it, as a user would fine-tune it.

    The same WavLM, its own x-vector head (the demo's sizes) and built-in AM-softmax loss.
    """
    from transformers import WavLMConfig, WavLMForXVector

    config = WavLMConfig.from_pretrained(model_dir, use_weighted_layer_sum=True, layerdrop=0.0,
                                         **HF_HEAD)  # fmt: skip
    model = WavLMForXVector.from_pretrained(model_dir, config=config).to(device).train()
    if freeze_cnn:
        model.freeze_feature_encoder()
    if checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def transformers_step(model, optimizer, scaler, batch, precision: str, device) -> None:
    """One training step as the ``transformers`` docs do it: attention mask, labels, loss."""
    wavs, lens = batch.sig
    valid = (lens * wavs.shape[1]).round().long()
    mask = (torch.arange(wavs.shape[1])[None] < valid[:, None]).long()
    # Wav2Vec2FeatureExtractor(do_normalize=True): each utterance to zero mean, unit variance.
    count = valid[:, None].clamp(min=1)
    mean = (wavs * mask).sum(1, keepdim=True) / count
    std = (((wavs - mean) * mask) ** 2).sum(1, keepdim=True).div(count).sqrt()
    wavs = (wavs - mean) / (std + 1e-7) * mask
    labels = batch.class_encoded.data.reshape(-1)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    with torch.autocast(torch.device(device).type, dtype, enabled=dtype is not None):
        loss = model(wavs.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def run_transformers(model_dir, model, precision, checkpointing, bucketing, args) -> dict:
    """``run_setting`` for ``transformers.WavLMForXVector`` trained with a plain loop."""
    freeze_cnn = frozen_cnn(model, args.freeze_cnn)
    hf_model, optimizer = transformers_trainer(model_dir, freeze_cnn, checkpointing, args.device)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    return timed_steps(
        lambda batch: transformers_step(hf_model, optimizer, scaler, batch, precision, args.device),
        args, bucketing,
        {"implementation": "transformers", "model": model, "head": "xvector",
         "head_params": trainable_parameters(hf_model) - trainable_parameters(hf_model.wavlm),
         "trainable_params": trainable_parameters(hf_model), "precision": precision,
         "frozen_cnn": freeze_cnn, "grad_checkpointing": checkpointing},
    )  # fmt: skip


def timed_steps(step, args, bucketing: bool, row: dict) -> dict:
    """Time ``args.steps`` calls of ``step(batch)`` after ``args.warmup`` untimed ones."""
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    audio = 0.0
    batches = training_batches(args.batch_size, args.warmup + args.steps, bucketing)
    for index, (batch, batch_audio) in enumerate(batches):
        if index == args.warmup:
            synchronize(args.device)
            start = time.perf_counter()
        step(batch)
        if index >= args.warmup:
            audio += batch_audio
    synchronize(args.device)
    seconds = time.perf_counter() - start
    return {
        **row,
        "bucketing": bucketing,
        "batch_size": args.batch_size,
        "steps_per_s": args.steps / seconds,
        "utts_per_s": args.steps * args.batch_size / seconds,
        "audio_s_per_s": audio / seconds,
        "peak_mb": peak_memory_mb(args.device),
        "device": device_name(args.device),
    }


def main() -> None:
    """Run every setting, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "base_plus"])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", help="default: all the device supports")
    parser.add_argument(
        "--grad_checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"]
    )
    parser.add_argument("--bucketing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument(
        "--freeze_cnn",
        choices=["auto", "yes", "no"],
        default="auto",
        help="auto: frozen for base_plus (as wavlm_td.yaml), trained for tiny (as the demo)",
    )
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=["recipe", "transformers"],
        default=["recipe"],
        help="transformers: WavLMForXVector with a plain AdamW loop, rows next to the recipe's",
    )
    parser.add_argument(
        "--heads",
        nargs="+",
        choices=["xvector", "ecapa", "mhfa"],
        default=["xvector"],
        help="speaker heads of the recipe rows (transformers rows: its x-vector head only)",
    )
    parser.add_argument(
        "--attention", nargs="+", choices=["sdpa", "eager"], default=["sdpa"],
        help="WavLM attention of the recipe rows (wavlm_attention; transformers rows: eager)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="repeat the grid (interleaved)")
    parser.add_argument("--json", default="bench_train.json")
    args = parser.parse_args()
    precisions = args.precisions or (
        ["fp32", "fp16", "bf16"] if args.device.startswith("cuda") else ["fp32", "bf16"]
    )
    rows = []
    print(
        "| implementation | model | head | head params | trainable params | precision "
        "| frozen CNN | grad ckpt | bucketing | steps/s | utts/s | audio s/s | peak MB |"
    )
    print("|---|---|---|---:|---:|---|---|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = model_dirs(tmp, args.models)
        grid = itertools.product(
            range(args.rounds),
            args.models,
            precisions,
            [choice == "on" for choice in args.grad_checkpointing],
            [choice == "on" for choice in args.bucketing],
            # innermost: the heads and the two ways of a setting run back to back
            [(implementation, recipe) for implementation in args.implementations
             for recipe in (itertools.product(args.heads, args.attention)
                            if implementation == "recipe" else [("xvector", "eager")])],
        )  # fmt: skip
        for _, model, precision, checkpointing, bucketing, (implementation, recipe) in grid:
            head = recipe[0]
            setting = (dirs[model], model, precision, checkpointing, bucketing)
            if implementation == "transformers":
                row = run_transformers(*setting, args)
            else:
                row = run_setting(*setting, recipe, args, tmp)
            rows.append(row)
            print(
                f"| {row['implementation']} | {model} | {head} | "
                f"{row['head_params'] / 1e6:.2f} M | "
                f"{row['trainable_params'] / 1e6:.2f} M | {precision} | {row['frozen_cnn']} | "
                f"{checkpointing} | {bucketing} | {row['steps_per_s']:.2f} | "
                f"{row['utts_per_s']:.1f} | {row['audio_s_per_s']:.1f} | {row['peak_mb']:.0f} |",
                flush=True,
            )
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
