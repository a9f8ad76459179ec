"""What the benchmark scripts share: the demo YAML's Brain and embedder, model folders, lengths."""

from __future__ import annotations

import collections
import json
import resource
import statistics
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.batch import PaddedBatch
from torch.overrides import TorchFunctionMode

from recipes.experiment import assembled_model
from recipes.tiny_wavlm import build_tiny_wavlm, save_wavlm, wavlm_base_plus_config
from recipes.train_speaker_embeddings import build_brain

#: The repository (benchmark scripts put it on ``sys.path`` and import this as
#: ``tests.benchmarks.common``, as the tests do).
ROOT = Path(__file__).resolve().parents[2]

HIDDEN = {"tiny": 96, "base_plus": 768}


def model_dirs(tmp, models=("tiny", "base_plus")) -> dict:
    """Local WavLM folders of ``models``: the demo's tiny one, a Base+ sized one (random weights).

    Only the ones asked for are written (the Base+ one is ~400 MB).
    """
    builders = {
        "tiny": lambda: build_tiny_wavlm(Path(tmp) / "tiny"),
        "base_plus": lambda: save_wavlm(Path(tmp) / "base_plus", wavlm_base_plus_config()),
    }
    return {model: builders[model]() for model in models}


def demo_hparams(model_dir, model: str, tmp, **overrides) -> dict:
    """``hparams/synthetic_demo.yaml`` loaded for a given WavLM."""
    overrides = {
        "output_folder": str(tmp),
        "wavlm_source": model_dir,
        "wavlm_hidden_size": HIDDEN[model],
        "noise_csv": None,
        **overrides,
    }
    with open(ROOT / "hparams" / "synthetic_demo.yaml", encoding="utf-8") as handle:
        return load_hyperpyyaml(handle, overrides)


def demo_brain(model_dir, model: str, tmp, run_opts: dict, **overrides):
    """``SpeakerBrain`` as ``hparams/synthetic_demo.yaml`` wires it, for a given WavLM."""
    hparams = demo_hparams(model_dir, model, tmp, **overrides)
    return build_brain(hparams, {"noprogressbar": True, **run_opts}, n_classes=50, n_phrases=10)


def demo_embedder(model_dir, model: str, tmp, **overrides):
    """The demo's embedding model (what scoring and exports run) for a given WavLM."""
    hparams = demo_hparams(model_dir, model, tmp, **overrides)
    return assembled_model(hparams["recipe_settings"].model, n_phrases=10).eval()


def deepmine_lengths(count: int, seed: int = 0) -> np.ndarray:
    """Utterance durations in seconds drawn like DeepMine's pass-phrases (1.5-5 s)."""
    return np.random.default_rng(seed).uniform(1.5, 5.0, count)


def training_brain(model_dir, model: str, tmp, run_opts: dict, **overrides):
    """``demo_brain`` ready for ``fit_batch`` calls: optimizers built, modules in train mode."""
    brain = demo_brain(model_dir, model, tmp, run_opts, **overrides)
    brain.hparams.epoch_counter.current, brain.steps_per_epoch, brain.step = 1, 1000, 0
    brain.init_optimizers()
    brain.modules.train()
    return brain


def training_batches(batch_size: int, steps: int, bucketing: bool, seed: int = 0):
    """Synthetic batches with DeepMine-like lengths; sorted by length when bucketing."""
    lengths = deepmine_lengths(batch_size * steps, seed)
    if bucketing:
        lengths = np.sort(lengths)
    for step in range(steps):
        chunk = lengths[step * batch_size : (step + 1) * batch_size]
        examples = [
            {
                "id": f"u{step}_{i}",
                "sig": torch.randn(int(seconds * 16000)) * 0.1,
                "class_encoded": torch.tensor([i % 50]),
                "phrase_encoded": torch.tensor([i % 10]),
            }
            for i, seconds in enumerate(chunk)
        ]
        yield PaddedBatch(examples), float(chunk.sum())


def count_host_syncs(brain, batches) -> collections.Counter:
    """``HostSyncCounter`` sites of ``fit_batch`` on every batch but the first.

    The first step runs uncounted: it creates the optimizer state.
    """
    counter = HostSyncCounter()
    for index, (batch, _) in enumerate(batches):
        brain.step += 1
        if index == 0:
            brain.fit_batch(batch)
            continue
        with counter:
            brain.fit_batch(batch)
    return counter.sites


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU (``peak_rss_mb``)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of the running process (MB).

    ``VmHWM`` of ``/proc/self/status`` where there is one: on Linux ``ru_maxrss`` carries the
    parent's peak over a fork + exec, so a script started by a big process reported that one's.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_ms(settings: dict, rounds: int, calls: int, device: str = "cpu") -> list[dict]:
    """Milliseconds per call of each ``settings`` callable, timed in interleaved rounds.

    Each callable runs once untimed first (caches, loader workers, optimizer state); then every
    round times ``calls`` calls of each in turn, so a noisy machine slows all alike. Returns one
    row per setting: name, median and the rounds.
    """
    for run in settings.values():
        run()
    times = {name: [] for name in settings}
    for _ in range(rounds):
        for name, run in settings.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                run()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / calls * 1000)
    return [
        {"setting": name, "ms_median": statistics.median(values), "ms_rounds": values}
        for name, values in times.items()
    ]


def write_rows(path, rows) -> None:
    """Write a benchmark's rows to the JSON file ``path`` and say so."""
    Path(path).write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {path}")


def device_name(device: str) -> str:
    """The GPU's name, or "cpu"."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


# Tensor operations that make the host wait for the GPU when their tensor lives there: a value
# read into Python, a copy to host memory, or an output whose size depends on the data.
SYNC_OPS = frozenset(
    {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "cpu", "numpy"}
    | {"nonzero", "masked_select", "unique", "argwhere"}
)
SYNC_OP_HINT = {"__getitem__": "x[mask]", "__setitem__": "x[mask] = ..."}


def _boolean_index(args) -> bool:
    """True when an indexing call's index is (or holds) a boolean tensor (a data-sized result)."""
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncCounter(TorchFunctionMode):
    """Counts the calls that would wait for the GPU, by the line of Python that made them.

    Runs anywhere (no GPU needed): torch reports each tensor operation to this mode, and the
    ones in ``SYNC_OPS`` (or boolean-mask indexing) are counted at their caller outside torch.
    On a CPU every tensor counts; on a GPU those that stay on the host (a lengths tensor before
    it is moved, a loss already copied back) would not, so the counts are an upper bound.
    """

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        """Count ``func`` when it syncs, then run it."""
        name = getattr(func, "__name__", "")
        if name in SYNC_OPS or (name in SYNC_OP_HINT and _boolean_index(args)):
            self.sites[(self._caller(), SYNC_OP_HINT.get(name, name))] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _caller() -> str:
        """``package/file.py:line function`` of the innermost frame outside torch and this file."""
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = Path(frame.filename)
            if "torch" in path.parts or path == Path(__file__):
                continue
            parts = path.parts
            if "site-packages" in parts:  # speechbrain/core.py, transformers/...
                parts = parts[parts.index("site-packages") + 1 :]
            elif path.is_relative_to(ROOT):
                parts = path.relative_to(ROOT).parts
            return f"{'/'.join(parts)}:{frame.lineno} {frame.name}"
        return "?"
