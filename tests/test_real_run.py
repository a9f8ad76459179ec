"""The user's real run, reproduced on the CPU: run options on the command line, half precision,
a hub id from the Hugging Face cache, DDP with a frozen warm-up and L2-SP, sharded scoring.

fp16 / bf16 CPU autocast stands in for CUDA's, gloo for NCCL, a local folder laid out as the
Hugging Face cache (``HF_HUB_OFFLINE=1``) for the hub.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from recipes.schedules import derive_total_steps
from recipes.settings import load_checked_hparams
from recipes.speaker_model import MaskedGroupNorm
from tests.helpers import ROOT

DEMO = str(ROOT / "hparams" / "synthetic_demo.yaml")


# ------------------------------------------------------------------------------------------------
# 1. Run options given on the command line reach the settings the recipe reads
# ------------------------------------------------------------------------------------------------
def test_command_line_run_options_reach_the_hparams(tmp_path, caplog):
    argv = [DEMO, "--output_folder", str(tmp_path), "--grad_accumulation_factor", "2",
            "--eval_precision", "bf16", "--max_grad_norm=3.5", "--number_of_epochs", "1"]  # fmt: skip
    _, run_opts, overrides, hparams = load_checked_hparams(argv)
    assert run_opts["grad_accumulation_factor"] == 2  # the Brain's value ...
    assert hparams["grad_accumulation_factor"] == 2  # ... is the one everything else reads
    assert hparams["eval_precision"] == "bf16" and hparams["max_grad_norm"] == 3.5
    assert "grad_accumulation_factor: 2" in overrides  # saved with the experiment's overrides
    with caplog.at_level(logging.INFO):
        derived = derive_total_steps(hparams, batches_per_epoch=128)
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
