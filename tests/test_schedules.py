"""The learning-rate schedule's length, derived from the data when the YAML leaves it null."""

from __future__ import annotations

import pytest
import torch

from recipes.train_speaker_embeddings import schedule_lengths
from recipes.training.schedules import WarmAndExpDecayToEnd, derive_total_steps
from tests.helpers import load_yaml


def _lrs(schedule, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    rates = []
    for _ in range(steps):
        schedule(optimizer)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_derived_length_counts_optimizer_steps_and_frozen_epochs():
    schedules = {
        "wavlm": WarmAndExpDecayToEnd(lr=1.0, n_warmup_steps=10, decay_factor=0.1),
        "head": WarmAndExpDecayToEnd(lr=1.0, n_warmup_steps=10, decay_factor=0.1),
        "fixed": WarmAndExpDecayToEnd(lr=1.0, n_warmup_steps=10, total_steps=50),
    }
    # 101 batches -> 51 optimizer steps per epoch; WavLM's optimizer steps in 3 of the 4 epochs.
    derived = derive_total_steps(schedules, 101, accumulation=2, epochs=4, frozen_epochs=1)
    assert derived == {"wavlm": 153, "head": 204}
    assert schedules["fixed"].decay_steps == 40  # a number set in the YAML is kept
    rates = _lrs(schedules["head"], 205)
    assert rates[10] == 1.0 and rates[204] == pytest.approx(0.1)  # lr * decay_factor at the end


@pytest.mark.parametrize("name", ["synthetic_demo.yaml", "wavlm_td.yaml"])
def test_both_recipes_derive_their_length(tmp_path, tiny_wavlm_dir, name):
    hparams = load_yaml(
        name,
        {"output_folder": str(tmp_path), "data_folder": str(tmp_path), "noise_csv": None,
         "wavlm_source": tiny_wavlm_dir, "wavlm_hidden_size": 96},
    )  # fmt: skip
    assert hparams["total_steps"] is None
    derived = schedule_lengths(hparams, 128)
    epochs = hparams["number_of_epochs"]
    accumulation = hparams["grad_accumulation_factor"]
    assert derived["head"] == epochs * -(-128 // accumulation)
    assert derived["wavlm"] == (epochs - hparams["freeze_wavlm_epochs"]) * -(-128 // accumulation)
    if name == "synthetic_demo.yaml":  # the 1024 the demo had by hand (its README numbers)
        assert derived == {"wavlm": 1024, "head": 1024}
