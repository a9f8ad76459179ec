"""Load a trained speaker model from a folder and embed datasets with it.

Two kinds of folder are accepted, so that models from both ecosystems are scored the same way:

- a folder written by ``recipes/export_model.py`` (SpeechBrain: ``hyperparams.yaml`` and
  ``tdsv_speaker_model.py``), loaded with SpeechBrain's ``foreign_class``;
- a Hugging Face ``*ForXVector`` directory (``config.json``, weights, ``preprocessor_config.json``),
  e.g. a local copy of ``aliyzd95/wavlm-deepmine-base-plus-sv`` or the ``hf/`` folder of an
  export, run the way ``transformers`` runs it (its feature extractor, its ``embeddings`` output).

Both come back as a ``TDSVSpeakerRecognition`` (``encode_batch``, ``verify_files``,
``verify_enrolment``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import speechbrain as sb
import torch
from speechbrain.dataio.preprocess import AudioNormalizer
from speechbrain.inference.interfaces import foreign_class
from speechbrain.utils.fetching import LocalStrategy
from torch import nn
from tqdm import tqdm
from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

from recipes.evaluation.scoring import EmbeddingTable
from recipes.model import onnx_verifier, speaker_model, trial_decisions
from recipes.model.speaker_model import TDSVSpeakerRecognition

#: The name of the model code inside an exported folder.
EXPORTED_MODULE = "tdsv_speaker_model.py"
#: The repository's code an exported folder carries, by its name there (byte copies): the
#: SpeechBrain model, the decisions both backends share, and the torch-free ONNX verifier.
EXPORTED_CODE = {
    EXPORTED_MODULE: speaker_model,
    "tdsv_trial_decisions.py": trial_decisions,
    "tdsv_onnx_verifier.py": onnx_verifier,
}


class HFXVectorEmbedder(nn.Module):
    """A ``transformers`` x-vector model (``WavLMForXVector`` and kin) as an embedding module.

    The waveform goes through the model's own feature extractor (zero mean, unit variance when
    its ``do_normalize`` says so), and the output is the model's ``embeddings``.
    """

    def __init__(self, source):
        super().__init__()
        self.model = AutoModelForAudioXVector.from_pretrained(source)
        self.extractor = AutoFeatureExtractor.from_pretrained(source)
        self.sample_rate = self.extractor.sampling_rate

    def forward(self, wavs: torch.Tensor, wav_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings ``[B, 1, D]`` of unpadded waveforms ``[B, T]``."""
        if wav_lens is not None and bool((wav_lens < 1).any()):
            raise ValueError("HFXVectorEmbedder embeds unpadded waveforms (one at a time)")
        inputs = self.extractor(
            list(wavs.float().cpu().numpy()), sampling_rate=self.sample_rate, return_tensors="pt"
        )
        inputs = {k: v.to(wavs.device) for k, v in inputs.items()}
        return self.model(**inputs).embeddings.unsqueeze(1)


def is_hf_xvector(folder: Path) -> bool:
    """True if ``folder`` holds a Hugging Face ``*ForXVector`` model."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(name.endswith("ForXVector") for name in architectures)


def load_verifier(folder, run_opts: dict | None = None) -> TDSVSpeakerRecognition:
    """The model in ``folder`` (exported SpeechBrain folder or HF x-vector directory)."""
    folder = Path(folder)
    run_opts = {"device": "cpu", **(run_opts or {})}
    if (folder / "hyperparams.yaml").is_file() and (folder / EXPORTED_MODULE).is_file():
        return foreign_class(
            source=str(folder),
            pymodule_file=EXPORTED_MODULE,
            classname="TDSVSpeakerRecognition",
            savedir=str(folder),
            local_strategy=LocalStrategy.NO_LINK,  # use the files in place, copy nothing
            run_opts=run_opts,
        )
    if is_hf_xvector(folder):
        embedder = HFXVectorEmbedder(folder)
        hparams = {"thresholds": None, "audio_normalizer": AudioNormalizer(embedder.sample_rate)}
        return TDSVSpeakerRecognition(
            modules={"embedding_model": embedder}, hparams=hparams, run_opts=run_opts
        )
    raise FileNotFoundError(
        f"{folder}: not a model folder. Expected an export of recipes/export_model.py "
        f"(hyperparams.yaml + {EXPORTED_MODULE}) or a Hugging Face *ForXVector directory "
        "(config.json with its architecture, weights, preprocessor_config.json)"
    )


def embed_dataset(verifier, dataset, loader_kwargs: dict, progress=True) -> dict:
    """Tables of every utterance (``id``, ``sig``) of a SpeechBrain dataset.

    ``verifier``: anything with ``embed_waveform`` (``TDSVSpeakerRecognition``, ``OnnxVerifier``).

    ``"speaker"`` embeddings, and the phrase branch's outputs when the model has one (one WavLM
    pass per utterance either way).
    """
    loader = sb.dataio.dataloader.make_dataloader(dataset, **loader_kwargs)
    outputs = {}
    for batch in tqdm(loader, desc="embedding", disable=not progress):
        for utt_id, wav, rel in zip(batch.id, batch.sig.data, batch.sig.lengths, strict=True):
            samples = max(1, round(float(rel) * wav.shape[0]))
            for name, vector in verifier.embed_waveform(wav[:samples]).items():
                if name != "seconds":  # the recipe's durations are the manifests'
                    outputs.setdefault(name, {})[utt_id] = np.asarray(vector)
    return {name: EmbeddingTable.from_dict(vectors) for name, vectors in outputs.items()}
