"""Build a small randomly initialized WavLM as a local Hugging Face directory.

No model hub is needed: the demo and the tests use this instead of ``microsoft/wavlm-base-plus``.
The directory holds ``config.json``, the weights and the ``preprocessor_config.json`` that
SpeechBrain's wrapper reads. ``wavlm_base_plus_config()`` and ``wavlm_large_config()`` give the
hub's WavLM Base+ and Large configs (for benchmarks and GPU checks with random weights).

    python recipes/tiny_wavlm.py --out results/tiny_wavlm
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from speechbrain.utils.distributed import run_on_main
from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

TINY = dict(
    hidden_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=256,
    conv_dim=(64, 64, 64, 64, 64, 64, 64),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    num_buckets=32,
    max_bucket_distance=200,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
    mask_time_prob=0.0,
)


#: Dropouts, LayerDrop and SpecAugment of the hub's WavLM configs (the recipe switches LayerDrop
#: off when it loads one: ``modules.WavLMEncoder``).
HUB_REGULARIZATION = dict(
    hidden_dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    feat_proj_dropout=0.1,
    mask_time_prob=0.05,
)


def wavlm_base_plus_config() -> WavLMConfig:
    """``microsoft/wavlm-base-plus``'s config (WavLMConfig's defaults are Base's architecture).

    Post-norm layers and a first CNN layer with GroupNorm (``feat_extract_norm: group``).
    """
    return WavLMConfig(
        feat_extract_norm="group", do_stable_layer_norm=False, layerdrop=0.05,
        **HUB_REGULARIZATION,
    )  # fmt: skip


def wavlm_large_config(**overrides) -> WavLMConfig:
    """``microsoft/wavlm-large``'s config: 24 pre-norm layers of 1024 ("stable layer norm").

    The encoder ends with a LayerNorm (``speaker_model.model_states``); every CNN layer has a
    per-frame LayerNorm (``feat_extract_norm: layer``). ``overrides``: e.g. a reduced width.
    """
    large = dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=False, layerdrop=0.1,
        **HUB_REGULARIZATION,
    )  # fmt: skip
    return WavLMConfig(**{**large, **overrides})


def save_wavlm(
    out, config: WavLMConfig, seed: int = 0, do_normalize: bool = True, dtype=torch.float32
) -> str:
    """Save a randomly initialized WavLM with ``config`` to ``out`` (atomically); return the path.

    ``do_normalize``: the feature extractor's waveform normalization (WavLM Base+ has none);
    ``dtype``: the stored weights' type (hub checkpoints are sometimes fp16). Does nothing if
    ``out`` already holds that model, so repeated runs and concurrent processes are safe. Under
    ``torchrun`` the main process builds it while the others wait: transformers' ``save_pretrained``
    writes nothing on another rank of an initialized process group.
    """
    out = Path(out)
    wanted = {**config.to_diff_dict(), "init_seed": seed, "do_normalize": do_normalize,
              "stored_dtype": str(dtype)}  # fmt: skip
    if not _holds(out, wanted):
        run_on_main(_build, args=[out, config, seed, do_normalize, dtype, wanted])
    return str(out)


def _build(out: Path, config: WavLMConfig, seed, do_normalize, dtype, wanted: dict) -> None:
    """Write the model of ``save_wavlm`` beside ``out``, then move it there in one rename."""
    if _holds(out, wanted):
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    torch.manual_seed(seed)
    WavLMModel(config).to(dtype).save_pretrained(tmp)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=do_normalize,
        return_attention_mask=True,
    ).save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps(wanted))
    if _holds(out, wanted):  # another process finished first: never remove its copy
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if out.exists():  # another model: moved aside in one rename, then removed
        aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        with contextlib.suppress(OSError):  # already moved by another process
            os.replace(out, aside / out.name)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process got there first with the same model
        shutil.rmtree(tmp, ignore_errors=True)


def _holds(folder: Path, wanted: dict) -> bool:
    """Whether ``folder`` holds a finished build of ``wanted`` (``build.json`` is written last)."""
    stamp = folder / "build.json"
    try:
        return json.loads(stamp.read_text()) == wanted
    except (OSError, ValueError):
        return False


def save_to_hub_cache(cache, repo_id: str, config: WavLMConfig, **options) -> Path:
    """A random WavLM laid out in a Hugging Face hub cache as ``repo_id`` (a stand-in for the hub).

    ``cache/models--ORG--NAME/snapshots/REV/`` with ``refs/main`` naming REV: what
    ``huggingface_hub`` finds with ``HF_HUB_CACHE=cache HF_HUB_OFFLINE=1``. ``options`` go to
    ``save_wavlm``. Returns the snapshot folder.
    """
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    snapshot = Path(save_wavlm(repo / "snapshots" / revision, config, **options))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def build_tiny_wavlm(out, seed: int = 0, **overrides) -> str:
    """Save the tiny demo WavLM (``TINY``, with ``overrides``) to ``out``; return the path."""
    return save_wavlm(out, WavLMConfig(**{**TINY, **overrides}), seed)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--base_plus", action="store_true", help="WavLM Base+, random weights")
    size.add_argument("--large", action="store_true", help="WavLM Large, random weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.base_plus:
        print(save_wavlm(args.out, wavlm_base_plus_config(), args.seed))
    elif args.large:
        print(save_wavlm(args.out, wavlm_large_config(), args.seed))
    else:
        print(build_tiny_wavlm(args.out, args.seed))


if __name__ == "__main__":
    main()
