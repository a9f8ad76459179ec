"""The user's real run (GPU, fp16, hub model, torchrun, command-line settings) on the CPU.

Run options on the command line, half precision, a hub id from the Hugging Face cache, DDP with
a frozen warm-up and L2-SP, sharded scoring.

fp16 / bf16 CPU autocast stands in for CUDA's, gloo for NCCL, a local folder laid out as the
Hugging Face cache (``HF_HUB_OFFLINE=1``) for the hub.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import soundfile
import speechbrain as sb
import torch
import torch.nn.functional as F
from speechbrain.dataio.batch import PaddedData
from transformers import WavLMConfig, WavLMModel

from recipes.evaluation.pretrained import package_paths
from recipes.experiment import usable_precision
from recipes.model.hf_xvector import hf_xvector_model, recipe_input
from recipes.model.modules import WavLMEncoder
from recipes.model.speaker_model import (
    MaskedGroupNorm,
    WavLMFromConfig,
    WavLMSpeakerEmbedder,
    XVectorHead,
)
from recipes.settings import load_checked_hparams
from recipes.tiny_wavlm import (
    TINY,
    build_tiny_wavlm,
    save_to_hub_cache,
    save_wavlm,
    wavlm_large_config,
)
from recipes.train_speaker_embeddings import build_brain, schedule_lengths
from recipes.training.augmentation import PrefetchedNoise, noise_reader
from recipes.training.randomness import TrainingRandomness
from tests.benchmarks.gpu_smoke import run as gpu_smoke_run
from tests.helpers import ROOT, fake_batch, free_port, load_yaml, run_script_command

DEMO = str(ROOT / "hparams" / "synthetic_demo.yaml")


# ------------------------------------------------------------------------------------------------
# 1. Run options given on the command line reach the settings the recipe reads
# ------------------------------------------------------------------------------------------------
def test_command_line_run_options_reach_the_hparams(tmp_path, caplog):
    argv = [DEMO, "--output_folder", str(tmp_path), "--grad_accumulation_factor", "2",
            "--eval_precision", "bf16", "--max_grad_norm=3.5",
            "--number_of_epochs", "1"]  # fmt: skip
    _, run_opts, overrides, hparams = load_checked_hparams(argv)
    assert run_opts["grad_accumulation_factor"] == 2  # the Brain's value ...
    assert hparams["grad_accumulation_factor"] == 2  # ... is the one everything else reads
    assert hparams["eval_precision"] == "bf16" and hparams["max_grad_norm"] == 3.5
    assert "grad_accumulation_factor: 2" in overrides  # saved with the experiment's overrides
    with caplog.at_level(logging.INFO):
        derived = schedule_lengths(hparams, batches_per_epoch=128)
    assert derived == {"wavlm": 64, "head": 64}
    assert "1 epochs x 64 optimizer steps per epoch" in caplog.text


def test_run_options_the_yaml_does_not_set_stay_run_options(tmp_path):
    argv = [DEMO, "--output_folder", str(tmp_path), "--device", "cpu", "--noprogressbar"]
    _, run_opts, _, hparams = load_checked_hparams(argv)
    assert run_opts["device"] == "cpu" and "device" not in hparams


# ------------------------------------------------------------------------------------------------
# 2. The masked first-layer GroupNorm keeps fp32 statistics under autocast
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seconds", [3, 20])
def test_masked_group_norm_matches_group_norm_under_autocast(dtype, seconds):
    torch.manual_seed(0)
    frames = seconds * 16000 // 5  # the first CNN layer's stride
    norm = MaskedGroupNorm(512, 512)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = 3 * torch.randn(2, 512, frames) + 1.5
    norm.valid_frames = torch.tensor([frames, frames // 2])
    with torch.autocast("cpu", dtype=dtype):
        y = norm(x)
    assert torch.isfinite(y).all()
    for row, valid in enumerate((frames, frames // 2)):
        expected = F.group_norm(x[row : row + 1, :, :valid], 512, norm.weight, norm.bias, norm.eps)
        assert (y[row : row + 1, :, :valid] - expected).abs().max() < 1e-3


def tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` cut to TF32's 10 mantissa bits, as Ampere+ tensor cores may read fp32 inputs.

    Truncated, the worst case: a sum of squares then drifts one way, as on the GPU.
    """
    bits = x.contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32)


def tf32_matrix_products(monkeypatch) -> None:
    """TF32 switched on as SpeechBrain does on a GPU, and emulated for the CPU's products."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)

    def emulated(exact):
        def product(a, b):  # TF32 where the flag allows it, as cuBLAS reads it at each call
            allowed = torch.backends.cuda.matmul.allow_tf32
            return exact(tf32(a), tf32(b)) if allowed else exact(a, b)

        return product

    for name in ("bmm", "matmul", "mm"):
        monkeypatch.setattr(torch, name, emulated(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: torch.matmul(a, b))


@pytest.mark.parametrize("seconds", [3, 20])
def test_masked_group_norm_statistics_are_fp32_with_tf32_on(monkeypatch, seconds):
    frames = seconds * 16000 // 5
    torch.manual_seed(0)
    x = 3 * torch.randn(2, 512, frames) + 1.5
    tf32_matrix_products(monkeypatch)
    norm = MaskedGroupNorm(512, 512)
    norm.valid_frames = torch.tensor([frames, frames // 2])

    def error(y):
        return max(
            float(
                (y[r : r + 1, :, :n] - F.group_norm(x[r : r + 1, :, :n].double(), 512)).abs().max()
            )
            for r, n in enumerate((frames, frames // 2))
        )

    with torch.no_grad():
        assert error(norm(x)) < 1e-4
        assert error(norm._masked_norm(x)) > 2e-4  # its products without strict_fp32: TF32 shows
    assert torch.backends.cuda.matmul.allow_tf32  # restored after the norm


# ------------------------------------------------------------------------------------------------
# 3 and 9. The frozen warm-up: the layer weights learn, WavLM does not; DDP with L2-SP and a
# WavLM that has SpecAugment's masked_spec_embed (as Base+: mask_time_prob 0.05)
# ------------------------------------------------------------------------------------------------
WARM_UP_STEPS = """
import json, os, sys
import torch
import speechbrain as sb
from recipes.train_speaker_embeddings import build_brain
from tests.helpers import fake_batch, load_yaml

output_folder, wavlm_source, find_unused = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
overrides = json.loads(sys.argv[4])
distributed = "RANK" in os.environ
if distributed:
    torch.distributed.init_process_group("gloo")  # rank and size from the environment
hparams = load_yaml("wavlm_td.yaml", {
    "data_folder": "unused", "output_folder": output_folder, "wavlm_source": wavlm_source,
    "wavlm_hidden_size": 96, "noise_csv": None, "emb_dim": 32, "augment": False,
    "warmup_steps": 1, **overrides,
})
run_opts = {"device": "cpu", "precision": "fp32", "eval_precision": "fp32",
            "distributed_backend": "gloo", "find_unused_parameters": find_unused}
brain = build_brain(hparams, run_opts, n_classes=3, n_phrases=2)
brain.on_fit_start()
model = brain.model()
wavlm = model.encoder.model
report = {"masked_spec_embed_trains": wavlm.masked_spec_embed.requires_grad}
for epoch, steps in ((1, 2), (2, 3)):  # freeze_wavlm_epochs: 1
    brain.hparams.epoch_counter.current = epoch
    brain.on_stage_start(sb.Stage.TRAIN, epoch)
    layers = model.layer_logits.detach().clone()
    weights = [p.detach().clone() for p in brain.wavlm_weights]
    named = {n: p.detach().clone() for n, p in wavlm.named_parameters()}
    losses = [float(brain.fit_batch(fake_batch())) for _ in range(steps)]
    report[epoch] = {
        "losses": losses,
        "layer_weights_moved": bool((model.layer_logits != layers).any()),
        "wavlm_moved": any(bool((p != w).any()) for p, w in zip(brain.wavlm_weights, weights)),
        "unmoved": [n for n, p in wavlm.named_parameters()  # trainable, yet no update
                    if p.requires_grad and bool((p == named[n]).all())],
        "l2sp": float(brain.l2sp()) if brain.l2sp is not None else None,
    }
if os.environ.get("RANK", "0") == "0":  # one report: two ranks' lines could interleave
    print("REPORT", json.dumps(report), flush=True)
if distributed:  # before the interpreter's exit, which can otherwise abort under gloo
    torch.distributed.destroy_process_group()
"""


def _warm_up_report(
    tmp_path, wavlm_dir, find_unused=False, distributed=False, processes=1, **overrides
) -> dict:
    """The warm-up steps' report: one process, or DDP (gloo) over ``processes`` processes."""
    script = tmp_path / "warm_up_steps.py"
    script.write_text(WARM_UP_STEPS)
    args = [str(tmp_path), wavlm_dir, str(int(find_unused)), json.dumps(overrides)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(script), *args]
    if distributed:  # DDP's reducer checks every process's gradients, as on GPUs
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={free_port()}", str(script), *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


@pytest.fixture(scope="module")
def masked_wavlm_dir(tmp_path_factory) -> str:
    """The tiny WavLM with Base+'s SpecAugment setting, hence a ``masked_spec_embed``."""
    return build_tiny_wavlm(tmp_path_factory.mktemp("wavlm") / "masked", mask_time_prob=0.05)


def test_frozen_warm_up_trains_the_layer_weights_not_wavlm(tmp_path, masked_wavlm_dir):
    report = _warm_up_report(tmp_path, masked_wavlm_dir)
    assert not report["masked_spec_embed_trains"]  # SpecAugment is off: never in the forward
    frozen, unfrozen = report["1"], report["2"]
    assert frozen["layer_weights_moved"] and not frozen["wavlm_moved"]
    assert frozen["l2sp"] == 0.0  # nothing moved WavLM from its pretrained weights
    assert unfrozen["wavlm_moved"] and unfrozen["layer_weights_moved"] and unfrozen["l2sp"] > 0
    assert all(math.isfinite(x) for x in frozen["losses"] + unfrozen["losses"])


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_with_frozen_warm_up_and_l2sp_trains_through_the_unfreezing(
    tmp_path, masked_wavlm_dir, find_unused
):
    report = _warm_up_report(tmp_path, masked_wavlm_dir, find_unused, distributed=True)
    assert report["1"]["layer_weights_moved"] and not report["1"]["wavlm_moved"]
    assert report["2"]["wavlm_moved"] and len(report["2"]["losses"]) == 3


def large_shaped(folder) -> str:
    """WavLM Large's layers, states and norms at a small width (random weights)."""
    narrow = dict(hidden_size=64, intermediate_size=128, conv_dim=(32,) * 7, layerdrop=0.0)
    return save_wavlm(folder, wavlm_large_config(**narrow))


def test_wavlm_large_last_state_is_the_normalized_encoder_output(tmp_path):
    encoder = WavLMEncoder(large_shaped(tmp_path / "large"), str(tmp_path / "hf"),
                           freeze_feature_extractor=False)  # fmt: skip
    wavlm = encoder.model.train()
    wav, lens = torch.randn(2, 16000), torch.tensor([1.0, 0.75])
    states = encoder(wav, lens)
    assert states.shape[0] == wavlm.config.num_hidden_layers + 1 == 25
    one = F.layer_norm(wav[:1], wav.shape[1:])  # Large's waveform normalization
    with torch.no_grad():  # what transformers 4.x returned last: the final LayerNorm applied
        wavlm.eval()
        unnormalized = wavlm(one, output_hidden_states=True).hidden_states[-1]
        expected = wavlm(one).last_hidden_state
        wavlm.train()
    assert not torch.allclose(unnormalized, expected, atol=1e-2)  # 5.x leaves it out
    torch.testing.assert_close(encoder.eval()(wav[:1])[-1], expected, atol=1e-5, rtol=1e-5)
    (states[-1].square().mean() + states[1].mean()).backward()
    norm = wavlm.encoder.layer_norm
    assert norm.weight.grad is not None and norm.bias.grad.abs().sum() > 0


def test_wavlm_large_trains_every_weight_under_ddp_without_l2sp_or_unused_parameter_search(
    tmp_path,
):
    report = _warm_up_report(
        tmp_path, large_shaped(tmp_path / "large"), distributed=True, processes=2,
        wavlm_hidden_size=64, l2sp_weight=0.0,
    )  # fmt: skip
    unfrozen = report["2"]
    assert unfrozen["l2sp"] is None and unfrozen["wavlm_moved"]
    assert unfrozen["unmoved"] == []  # the final LayerNorm included: each got a gradient
    assert all(math.isfinite(x) for x in unfrozen["losses"])


# ------------------------------------------------------------------------------------------------
# 5. A hub id: one download into the Hugging Face cache, offline use, fp32 weights
# ------------------------------------------------------------------------------------------------
HUB_RUNS = """
import json, sys
from pathlib import Path
from tests.helpers import load_yaml

root, report = Path(sys.argv[1]), {}
for seed in (1, 2):  # two runs (output folders) of the real YAML with the hub's model id
    hparams = load_yaml("wavlm_td.yaml", {
        "data_folder": str(root / "data"), "output_folder": str(root / f"run{seed}"),
        "wavlm_source": "acme/wavlm-base-plus-tiny", "wavlm_hidden_size": 96,
    })
    wavlm = hparams["wavlm"]
    report[seed] = {
        "dtypes": sorted({str(p.dtype) for p in wavlm.model.parameters()}),
        "files_in_run": [str(p) for p in Path(hparams["save_folder"]).rglob("*") if p.is_file()],
        "normalize_wav": bool(wavlm.normalize_wav),
        "weight": float(wavlm.model.encoder.layers[0].attention.k_proj.weight[0, 0]),
    }
try:
    load_yaml("wavlm_td.yaml", {"data_folder": "x", "output_folder": str(root / "run3"),
                                "wavlm_source": "acme/not-downloaded"})
except FileNotFoundError as error:
    report["missing"] = str(error)
print("REPORT", json.dumps(report))
"""


def test_a_hub_id_resolves_offline_from_the_hugging_face_cache(tmp_path):
    cache = tmp_path / "hf_cache"
    snapshot = save_to_hub_cache(
        cache, "acme/wavlm-base-plus-tiny", WavLMConfig(**{**TINY, "mask_time_prob": 0.05}),
        do_normalize=False, dtype=torch.float16,  # as some hub checkpoints are stored
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    command = [sys.executable, "-c", HUB_RUNS, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    stored = WavLMModel.from_pretrained(snapshot).encoder.layers[0].attention.k_proj.weight
    for seed in ("1", "2"):
        run = report[seed]
        assert run["dtypes"] == ["torch.float32"]  # trained in fp32 whatever the checkpoint's
        assert run["files_in_run"] == []  # no copy of the model in the run's folder
        assert not run["normalize_wav"]  # the model's own feature extractor setting
        assert run["weight"] == pytest.approx(float(stored[0, 0].detach()))
    assert "acme/not-downloaded" in report["missing"] and str(cache) in report["missing"]


# ------------------------------------------------------------------------------------------------
# 6. The export's Hugging Face check feeds the model what the recipe feeds it
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("do_normalize", [False, True])
def test_hf_check_follows_the_models_own_normalization(do_normalize):
    torch.manual_seed(0)
    # WavLM Large's CNN (per-frame LayerNorms, biases) is not invariant to the input's scale, as
    # Base+'s first GroupNorm is: there a wrong normalization would pass the check unnoticed.
    config = {**TINY, "feat_extract_norm": "layer", "conv_bias": True}
    head = XVectorHead(96, (32, 32, 32, 32, 64), embedding_dim=16)
    encoder = WavLMFromConfig(config, normalize_wav=do_normalize)
    embedder = WavLMSpeakerEmbedder(encoder, head).eval()
    hf = hf_xvector_model(embedder, torch.nn.Linear(16, 3, bias=False), ["a", "b", "c"])
    wav = 0.05 * torch.randn(24000) + 0.01
    with torch.no_grad():
        ours = embedder(wav[None]).squeeze(1)
        fed = hf(input_values=recipe_input(wav, do_normalize)).embeddings
        other = hf(input_values=recipe_input(wav, not do_normalize)).embeddings
    assert F.cosine_similarity(ours, fed).min() > 0.9999
    # The other normalization is measurably off (a random model's embeddings are all alike, so
    # the gap is relative): the check compares what the recipe computes, not a near miss.
    assert (ours - other).abs().max() > 5 * (ours - fed).abs().max()
    assert torch.equal(recipe_input(wav, False)[0], wav)  # Base+: the raw waveform


# ------------------------------------------------------------------------------------------------
# 7. Evaluation precision a device lacks falls back to fp32
# ------------------------------------------------------------------------------------------------
def test_eval_precision_a_device_lacks_falls_back_to_fp32(caplog):
    with caplog.at_level(logging.WARNING):
        assert usable_precision("fp16", "cpu") == "fp32"
    assert "eval_precision fp16 on cpu" in caplog.text and "evaluating in fp32" in caplog.text
    assert usable_precision("bf16", "cpu") == "bf16"  # CPU autocast has bf16 (AMX here)
    assert usable_precision("fp32", "cpu") == "fp32"


# ------------------------------------------------------------------------------------------------
# 10. The suite asks for no GPU, on a machine with one too
# ------------------------------------------------------------------------------------------------
def test_processes_the_tests_start_see_no_gpu():
    probe = "import torch; print(torch.cuda.device_count(), torch.cuda.is_available())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.split() == ["0", "False"]
    assert not torch.cuda.is_available()
    assert "--device" in run_script_command("train_speaker_embeddings.py", "out", "corpus")


# ------------------------------------------------------------------------------------------------
# 8. Noise files are read by the loader's workers, not in the training step
# ------------------------------------------------------------------------------------------------
def test_prefetched_noise_mixes_the_batch_crops_at_the_snr():
    torch.manual_seed(0)
    add_noise = PrefetchedNoise(snr_low=10, snr_high=10)
    clean = torch.sin(torch.arange(16000) / 5.0).repeat(2, 1)
    crops = torch.randn(2, 12000)  # shorter than the (speed-perturbed) speech: repeated
    add_noise.use(crops, torch.tensor([1.0, 0.5]))
    noisy = add_noise(clean, torch.ones(2))
    factor = 1 / (10 ** (10 / 20) + 1)
    added = noisy - (1 - factor) * clean
    for row, valid in enumerate((12000, 6000)):
        expected = crops[row, :valid].repeat(3)[:16000]
        assert F.cosine_similarity(added[row], expected, dim=0) > 0.9999
        ratio = ((1 - factor) * clean[row]).pow(2).mean().sqrt() / added[row].pow(2).mean().sqrt()
        assert float(ratio) == pytest.approx(10 ** (10 / 20), rel=1e-3)


def test_training_step_reads_no_noise_file(tmp_path, tiny_wavlm_dir, monkeypatch):
    hparams = load_yaml("synthetic_demo.yaml", {
        "output_folder": str(tmp_path), "wavlm_source": tiny_wavlm_dir, "emb_dim": 32,
        "aug_speed": False, "aug_drop_freq": False, "aug_drop_chunk": False,
        "wav_augment": {"augment_prob": 1.0, "min_augmentations": 1, "max_augmentations": 1},
    })  # fmt: skip
    brain = build_brain(hparams, {"device": "cpu"}, n_classes=3, n_phrases=2)
    brain.hparams.epoch_counter.current = 1
    brain.on_fit_start()
    batch = fake_batch()
    batch.noise = PaddedData(torch.randn(4, 8000), torch.ones(4))

    def no_file_reads(*args, **kwargs):
        raise AssertionError("the training step read an audio file")

    for module in (sb.dataio.dataio, sb.augment.time_domain, soundfile):
        for name in ("read_audio", "read"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_file_reads)
    mixed, load = [], PrefetchedNoise._load_noise

    def recorded(self, lengths, max_length):
        mixed.append(max_length)
        return load(self, lengths, max_length)

    monkeypatch.setattr(PrefetchedNoise, "_load_noise", recorded)
    assert torch.isfinite(brain.fit_batch(batch))
    assert mixed  # the batch's own noise crops were mixed in


def test_noise_reader_gives_crops_and_checks_a_users_noise_list(tmp_path):
    lines = ["ID,duration,wav,wav_format,wav_opts"]
    for i, (seconds, rate) in enumerate([(2.0, 16000), (0.5, 16000), (1.0, 8000)]):
        soundfile.write(
            tmp_path / f"n{i}.wav", 0.1 * torch.randn(int(seconds * rate)).numpy(), rate
        )
        lines.append(f"n{i},{seconds},$data_root/n{i}.wav,wav,")
    csv = tmp_path / "noise.csv"
    csv.write_text("\n".join(lines[:3]) + "\n")
    randomness = TrainingRandomness(seed=3)
    reader = noise_reader(csv, tmp_path, 16000, 16000, check=True, randomness=randomness)
    lengths = {int(reader(f"utt{i}").numel()) for i in range(40)}
    assert lengths == {16000, 8000}  # a crop, or the whole of a shorter file
    # Keyed by utterance and epoch: a resumed epoch, in any worker, mixes the same noise.
    assert torch.equal(reader("utt1"), reader("utt1"))
    first_epoch = [reader(f"utt{i}") for i in range(8)]
    randomness.set_epoch(2)
    assert any(not torch.equal(a, reader(f"utt{i}")) for i, a in enumerate(first_epoch))
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"noise.csv line 4: .*n2.wav is at 8000 Hz"):
        noise_reader(csv, tmp_path, 16000, 16000, check=True, randomness=randomness)
    csv.write_bytes(("\n".join([*lines[:3], "bruit_é,1.0,$data_root/n0.wav,wav,"]) + "\n").encode(
        "latin-1"
    ))  # fmt: skip
    with pytest.raises(ValueError, match=r"noise.csv:4: not UTF-8 \(byte 0xe9\)"):
        noise_reader(csv, tmp_path, 16000, 16000, check=True, randomness=randomness)


# ------------------------------------------------------------------------------------------------
# The GPU smoke script runs its steps small on the CPU, so that it works the day a GPU is lent
# ------------------------------------------------------------------------------------------------
GPU_SMOKE = ROOT / "tests" / "benchmarks" / "gpu_smoke.py"


def gpu_smoke_call(tmp_path, call: str, *args) -> tuple[subprocess.CompletedProcess, dict]:
    """``gpu_smoke.py --device cpu --quick --call CALL ARGS``: the process and its JSON."""
    out = tmp_path / f"{call}.json"
    command = [sys.executable, str(GPU_SMOKE), "--device", "cpu", "--quick", "--call", call,
               "--json", str(out), *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    return result, json.loads(out.read_text())


@pytest.mark.slow
def test_gpu_smoke_script_runs_its_two_calls_quick_on_the_cpu(tmp_path, tiny_corpus):
    result, core = gpu_smoke_call(tmp_path, "core")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert list(core) == ["versions", "group_norm", "ddp", "training", "extraction"]
    assert all(section["status"] == "ok" for section in core.values())
    ddp = core["ddp"]["result"]
    assert ddp["base_plus"]["masked_spec_embed_trains"] is False
    assert ddp["large"]["l2sp"] is None and ddp["large"]["wavlm_moved"]  # no L2-SP, no unused
    assert {row["model"] for row in core["training"]["result"]} == {"base_plus", "large"}
    result, e2e = gpu_smoke_call(tmp_path, "end_to_end", "--corpus", str(tiny_corpus))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert list(e2e) == ["versions", "end_to_end"]
    e2e = e2e["end_to_end"]["result"]
    assert e2e["frozen_then_unfrozen"] and e2e["export_checks"]["speechbrain_min_cosine"] > 0.9999
    # 20 training batches of 8 per epoch, accumulated 2 by 2: 10 optimizer steps per epoch.
    assert e2e["total_steps_line"].startswith("2 epochs x 10 optimizer steps per epoch")
    assert e2e["reloaded_on_cpu"]["reason"] in ("", "speaker", "wrong pass-phrase")


def test_a_gpu_smoke_call_skips_the_sections_its_budget_cannot_hold(tmp_path):
    result, report = gpu_smoke_call(tmp_path, "core", "--budget_s", "25")
    assert result.returncode == 1  # not every section ran: the call did not pass
    assert report["versions"]["status"] == report["group_norm"]["status"] == "ok"
    for section in ("ddp", "training", "extraction"):
        assert re.fullmatch(r"skipped: \d+ s left of the call's budget, it needs up to \d+ s",
                            report[section]["status"])  # fmt: skip


def test_a_gpu_smoke_call_stopped_midway_leaves_its_finished_sections(tmp_path):
    out = tmp_path / "core.json"
    command = [sys.executable, str(GPU_SMOKE), "--device", "cpu", "--quick", "--call", "core",
               "--json", str(out)]  # fmt: skip
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, **quiet)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            report = json.loads(out.read_text()) if out.exists() else {}
            if report.get("ddp", {}).get("status") == "running":
                break
            time.sleep(0.05)
    finally:  # as the lent machine stops a command at its limit: all of it, at once
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    report = json.loads(out.read_text())
    assert report["versions"]["status"] == report["group_norm"]["status"] == "ok"
    assert report["ddp"] == {"status": "running"}  # named, with what finished before it


def test_the_hub_user_check_keeps_the_packages_on_pythonpath_not_the_repository(monkeypatch):
    site = "/tmp/site"  # where device_kit.py installs what the GPU machine's image lacks
    paths = [str(ROOT), site, str(ROOT / "recipes")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    assert package_paths() == [site]


def test_gpu_smokes_subprocesses_keep_the_packages_on_pythonpath(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}  # as device_kit.py installs them
    printed = gpu_smoke_run([sys.executable, "-c", "import sys; print(sys.path)"], "print", env=env)
    assert str(tmp_path / "site") in printed and str(ROOT) in printed
