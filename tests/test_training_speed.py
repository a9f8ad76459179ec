"""What keeps the training step fast stays in place: few host syncs, the same behaviour.

Also the recipe's data-wait share (logged per epoch), the measure of whether the loaders keep up.

``tests/benchmarks/bench_syncs.py`` counts the operations that would make the host wait for a
GPU; these tests hold the recipe to its count, and check that the sync-free versions of the
margin warm-up, the adaptive scale and the non-finite-gradient check still do their job.
"""

from __future__ import annotations

import math
import time

import pytest
import speechbrain as sb
import torch

from recipes.model.modules import MarginSoftmax, WavLMEncoder
from tests.benchmarks.common import count_host_syncs, training_batches, training_brain
from tests.helpers import load_yaml


@pytest.fixture
def brain(tmp_path, tiny_wavlm_dir):
    """The demo's SpeakerBrain ready for fit_batch (adaptive scale: its update runs too)."""
    return training_brain(
        tiny_wavlm_dir, "tiny", tmp_path, {"device": "cpu"}, scale_mode="adaptive"
    )


def test_a_training_step_syncs_only_in_speechbrains_loop_and_hf(brain):
    """The recipe syncs only in its gradient and padding checks, once a step; none per parameter."""
    sites = count_host_syncs(brain, training_batches(4, 3, bucketing=False))  # 2 counted steps
    ours = {site: n for (site, _), n in sites.items() if site.startswith("recipes/")}
    # One read per step each: check_gradients' flags, and compute_forward's padding check
    # (on the batch's lengths before they are copied to the device: no GPU wait there).
    assert sorted(site.split()[-1] for site in ours) == ["check_gradients", "compute_forward"]
    assert list(ours.values()) == [2, 2], ours
    assert max(sites.values()) <= 2, sites  # nothing once per parameter
    # SpeechBrain's Augmenter syncs in the augmentations a step draws (which, depends on the
    # step's seed); the rest is a fixed budget: ours, HF's masking, SpeechBrain's loss check and
    # loss read.
    fixed = {site: n for site, n in sites.items() if "speechbrain/augment/" not in site[0]}
    assert sum(fixed.values()) <= 2 * 5, sites


def test_mhfa_heads_and_l2sp_add_no_host_sync(tmp_path, tiny_wavlm_dir):
    """The MHFA speaker head and L2-SP run on the device alone."""
    brain = training_brain(
        tiny_wavlm_dir, "tiny", tmp_path, {"device": "cpu"},
        head_type="mhfa", l2sp_weight=0.01,
    )  # fmt: skip
    brain.on_fit_start()  # creates the L2-SP anchors, as fit does
    assert brain.l2sp is not None
    sites = count_host_syncs(brain, training_batches(4, 3, bucketing=False))
    ours = {site: n for (site, _), n in sites.items() if site.startswith("recipes/")}
    assert sorted(site.split()[-1] for site in ours) == ["check_gradients", "compute_forward"]
    assert list(ours.values()) == [2, 2], ours


def test_gradient_check_drops_only_the_non_finite_gradient(brain):
    """SpeechBrain's semantics: the bad gradient is dropped, the others are kept as they are."""
    params = [p for p in brain.modules.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    params[3].grad[0] = math.nan
    params[5].grad.view(-1)[-1] = math.inf
    brain.check_gradients()
    assert params[3].grad is None and params[5].grad is None
    kept = [p for i, p in enumerate(params) if i not in (3, 5)]
    assert all(p.grad is not None and bool((p.grad == 1).all()) for p in kept)


def test_margin_warmup_follows_progress_and_survives_a_checkpoint():
    loss = MarginSoftmax(margin=0.2, margin_warmup_epochs=2.0)
    loss.set_progress(1.0)
    assert loss.current_margin() == pytest.approx(0.1)
    resumed = MarginSoftmax(margin_type="aam", margin=0.2, margin_warmup_epochs=2.0)
    resumed.load_state_dict(loss.state_dict())
    assert resumed.current_margin() == pytest.approx(0.1)
    assert resumed.margin_fn.margin == pytest.approx(0.1)
    assert resumed.margin_fn.cos_m == pytest.approx(math.cos(0.1))


def test_adaptive_scale_reads_the_target_cosines():
    """AdaCos's median target angle: all targets at cosine 0.5 -> angle pi/3, capped at pi/4."""
    loss = MarginSoftmax(scale_mode="adaptive", n_classes=5)
    cosine = torch.full((4, 5), 0.1)
    targets = torch.tensor([0, 1, 2, 3])
    cosine[torch.arange(4), targets] = 0.5
    scale = float(loss.adaptive_scale)
    loss._update_adaptive_scale(cosine, targets)
    b_avg = 4 * math.exp(scale * 0.1)
    assert float(loss.adaptive_scale) == pytest.approx(math.log(b_avg) / math.cos(math.pi / 4))


def test_data_wait_share_is_the_time_between_steps(brain):
    """Steps of 20 ms with 60 ms between them: the wait is ~2/3 of the time (first wait aside)."""
    brain.on_stage_start(sb.Stage.TRAIN)
    for _ in range(3):
        brain.on_fit_batch_start(None, should_step=False)
        time.sleep(0.02)
        brain.on_fit_batch_end(None, None, None, should_step=False)
        time.sleep(0.06)
    assert 0.5 < brain.data_wait_share() < 0.8
    brain.on_stage_start(sb.Stage.TRAIN)
    assert brain.data_wait_share() == 0.0


def test_augmentation_keeps_a_full_length_batch_unpadded(tmp_path, tiny_wavlm_dir):
    """compute_forward relies on it to skip the padding masks for full-length crops."""
    hparams = load_yaml(
        "wavlm_td.yaml",
        {
            "data_folder": str(tmp_path),
            "output_folder": str(tmp_path / "out"),
            "wavlm_source": tiny_wavlm_dir,
            "wavlm_hidden_size": 96,
            "noise_csv": None,
        },
    )
    torch.manual_seed(0)
    for _ in range(20):
        wavs, lens = hparams["wav_augment"](torch.randn(4, 16000) * 0.1, torch.ones(4))
        assert wavs.shape[0] == 4 and bool((lens == 1).all()), lens


def test_an_unpadded_batch_takes_the_unmasked_path_to_the_same_features(tiny_wavlm_dir, tmp_path):
    wavlm = WavLMEncoder(tiny_wavlm_dir, str(tmp_path), freeze_feature_extractor=False).eval()
    wavs = torch.randn(3, 16000) * 0.1
    with torch.no_grad():
        masked, unmasked = wavlm(wavs, torch.ones(3)), wavlm(wavs, None)
    assert torch.allclose(masked, unmasked, atol=1e-5)


def test_the_transformers_baseline_of_bench_train_trains(tiny_wavlm_dir):
    from tests.benchmarks.bench_train import transformers_step, transformers_trainer

    model, optimizer = transformers_trainer(tiny_wavlm_dir, False, False, "cpu")
    head = model.objective.weight if hasattr(model, "objective") else model.classifier.weight
    before = head.detach().clone()
    scaler = torch.amp.GradScaler(enabled=False)
    for batch, _ in training_batches(4, 2, bucketing=True):
        transformers_step(model, optimizer, scaler, batch, "fp32", "cpu")
    assert torch.isfinite(head).all() and not torch.equal(before, head)
