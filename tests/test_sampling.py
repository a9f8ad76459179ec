"""Batch samplers: phrase-level batching and the configured sampler options."""

from __future__ import annotations

import pytest
from speechbrain.dataio.dataset import DynamicItemDataset

from recipes.experiment import SamplingSettings, train_loader_options
from recipes.training.sampling import PhraseBatchSampler, collate_readable

PHRASES = ["01"] * 7 + ["06"] * 5 + ["09"] * 10


def test_phrase_batches_hold_one_phrase_and_cover_everything_once():
    sampler = PhraseBatchSampler(PHRASES, batch_size=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 2 + 3
    assert all(len({PHRASES[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(PHRASES)))
    again = list(PhraseBatchSampler(PHRASES, batch_size=4, seed=1))
    assert again == batches  # deterministic for a seed and epoch (resumable)
    sampler.set_epoch(1)
    assert list(sampler) != batches


def _dataset():
    data = {f"u{i}": {"duration": 1.0 + i % 3, "phrase_id": p} for i, p in enumerate(PHRASES)}
    return DynamicItemDataset(data)


def _settings(kind, on_bad_audio="fail"):
    return SamplingSettings(
        batch_sampler=kind,
        loader_options={"batch_size": 4, "shuffle": True, "num_workers": 0},
        seed=3,
        on_bad_audio=on_bad_audio,
    )


def test_loader_options_for_each_sampler():
    dataset = _dataset()
    assert train_loader_options(_settings("random"), dataset)["batch_size"] == 4
    phrase = train_loader_options(_settings("phrase"), dataset)
    assert isinstance(phrase["batch_sampler"], PhraseBatchSampler) and "batch_size" not in phrase
    with pytest.raises(KeyError):  # refused with its allowed values at start-up (settings.py)
        train_loader_options(_settings("bogus"), dataset)
    skip = train_loader_options(_settings("random", "skip"), dataset)
    assert skip["collate_fn"] is collate_readable
    with pytest.raises(KeyError):
        train_loader_options(_settings("random", "ignore"), dataset)


def test_collate_readable_leaves_out_unreadable_examples():
    import torch

    batch = collate_readable(
        [
            {"id": "a", "sig": torch.ones(3)},
            {"id": "b", "sig": None},
            {"id": "c", "sig": torch.ones(5)},
        ]
    )
    assert batch.id == ["a", "c"] and batch.sig.data.shape == (2, 5)
    with pytest.raises(RuntimeError, match="unreadable"):
        collate_readable([{"id": "b", "sig": None}])
