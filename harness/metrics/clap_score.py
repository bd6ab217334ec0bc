"""CLAP score of text-to-audio samples against their prompts, through transformers' ClapModel.

Definition: the mean over samples of cos(E_audio, E_text), the cosine similarity of CLAP's projected
audio and text embeddings, unscaled and unclipped (range -1..1), as text-to-audio papers report it
(e.g. AudioLDM 2, Stable Audio's evaluation); a percentile-bootstrap interval over samples is attached.

Audio samples are [S, T] or [S, 1, T] waveforms at the model's `sample_rate` (models.yaml), resampled
with a polyphase filter (scipy.signal.resample_poly) to the CLAP feature extractor's rate.

Two choices make the score a function of each sample alone (laion-clap's own inference does the same):
- transformers' feature extractor marks a random clip of a batch as "longer" when no clip is longer
  than the model's window, so a clip's embedding would depend on its batch; here `is_longer` is each
  clip's true length test.
- clips longer than the window are cropped at random by the extractor (rand_trunc, fusion); its numpy
  RNG is seeded per clip with CROP_SEED (and the caller's RNG state restored), so reruns agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from harness.errors import ConfigError, StepbenchError
from harness.metrics.base import EvalContext, Metric, MetricValue
from harness.metrics.text_alignment import (bootstrap_interval, bootstrap_provenance, downloads_allowed,
                                            embed_in_batches, files_sha256, hf_cache_dir, load_prompts,
                                            missing_weights, pairwise_cosine, prompts_sha256, recorded_prompts)

DEFAULT_MODEL = "laion/clap-htsat-unfused"
DEFAULT_BATCH_SIZE = 32
CROP_SEED = 0
DEFINITION = "mean over samples of cos(audio_emb, text_emb) (unscaled, unclipped: -1..1)"


@dataclass
class LoadedClap:
    model: Any  # transformers.ClapModel, eval mode
    processor: Any  # transformers.ClapProcessor: feature_extractor + tokenizer
    provenance: dict

    @property
    def sampling_rate(self) -> int:
        return int(self.processor.feature_extractor.sampling_rate)


# --- weights -----------------------------------------------------------------------------------------

def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def resolve_clap_dir(source: str, cache_dir: str | None = None) -> Path:
    """A local directory holding the CLAP config, weights and processor files: `source` itself, or the
    hub id's snapshot in the Hugging Face cache (downloaded only when the hub is online)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(source):
        raise missing_weights(f"CLAP {source}", f"the directory {path}")
    from huggingface_hub import snapshot_download

    where = f"the Hugging Face cache {hf_cache_dir(cache_dir)} (and no directory ./{source})"
    try:
        return Path(snapshot_download(source, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # not cached (or a malformed id)
        if not downloads_allowed():
            raise missing_weights(f"CLAP {source}", where) from None
    try:  # the library's own download picks the files it needs (safetensors over pickles)
        from transformers import ClapModel, ClapProcessor

        ClapModel.from_pretrained(source, cache_dir=cache_dir)
        ClapProcessor.from_pretrained(source, cache_dir=cache_dir)
        return Path(snapshot_download(source, cache_dir=cache_dir, local_files_only=True))
    except Exception as err:
        raise missing_weights(f"CLAP {source}", where, err) from None


def _weight_files(directory: Path) -> list[Path]:
    """The files from_pretrained reads weights from (safetensors preferred, as transformers does)."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(directory.glob(pattern))
        if files:
            return files
    return []


def load_clap(source: str = DEFAULT_MODEL, cache_dir: str | None = None, device: str = "cpu") -> LoadedClap:
    import transformers
    from transformers import ClapModel, ClapProcessor

    directory = resolve_clap_dir(source, cache_dir)
    weights = _weight_files(directory)
    if not weights:
        raise missing_weights(f"CLAP {source}", f"{directory} (no *.safetensors or pytorch_model*.bin)")
    try:
        model = ClapModel.from_pretrained(directory).to(device).eval()
        processor = ClapProcessor.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise StepbenchError(f"CLAP {source}: cannot load from {directory} ({str(err).splitlines()[0]})") from None
    fe = processor.feature_extractor
    provenance = {"clap_model": source, "weights_sha256": files_sha256(weights),
                  "transformers_version": transformers.__version__, "clap_sampling_rate": int(fe.sampling_rate),
                  "max_length_s": fe.nb_max_samples / fe.sampling_rate, "truncation": fe.truncation,
                  "padding": fe.padding, "crop_seed": CROP_SEED}
    return LoadedClap(model, processor, provenance)


# --- audio -> CLAP input -----------------------------------------------------------------------------

def mono_waveforms(samples: np.ndarray) -> np.ndarray:
    """[S, T] or [S, 1, T] -> float64 [S, T]."""
    x = np.asarray(samples)
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 2:
        raise StepbenchError(f"clap_score needs mono audio samples [S, T] or [S, 1, T]; got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise StepbenchError("clap_score got non-finite sample values (a diverged cell should say so)")
    return x.astype(np.float64)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """[S, T] at from_rate -> [S, T'] at to_rate, polyphase with scipy's default Kaiser anti-alias filter."""
    if from_rate == to_rate:
        return audio
    from scipy.signal import resample_poly

    g = gcd(int(from_rate), int(to_rate))
    return resample_poly(audio, int(to_rate) // g, int(from_rate) // g, axis=-1)


def audio_features(feature_extractor, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, T] at the extractor's rate -> (input_features [S, C, frames, mels], is_longer [S, 1]), clip by
    clip: each clip's features depend on that clip only (see the module docstring)."""
    features, longer = [], []
    state = np.random.get_state()
    try:
        for waveform in audio:
            np.random.seed(CROP_SEED)
            out = feature_extractor(waveform, sampling_rate=feature_extractor.sampling_rate, return_tensors="pt")
            features.append(out["input_features"])
            longer.append(len(waveform) > feature_extractor.nb_max_samples)
    finally:
        np.random.set_state(state)
    return torch.cat(features), torch.tensor(longer).reshape(-1, 1)


# --- embeddings and scores -------------------------------------------------------------------------

def _pooled(out) -> torch.Tensor:
    # transformers < 5 returns the embedding itself, >= 5 a model output with it as pooler_output
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def embed_audio(clap: LoadedClap, audio: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """[S, T] waveforms at the extractor's rate -> unit-norm audio embeddings [S, D] (float32, CPU)."""
    device = next(clap.model.parameters()).device

    def embed_batch(start, stop):
        features, longer = audio_features(clap.processor.feature_extractor, audio[start:stop])
        emb = _pooled(clap.model.get_audio_features(input_features=features.to(device, torch.float32),
                                                    is_longer=longer.to(device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    return embed_in_batches(len(audio), batch_size, embed_batch)


def embed_texts(clap: LoadedClap, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Captions -> unit-norm text embeddings [N, D]."""
    device = next(clap.model.parameters()).device

    def embed_batch(start, stop):
        tokens = clap.processor.tokenizer(list(texts[start:stop]), padding=True, truncation=True,
                                          return_tensors="pt")
        emb = _pooled(clap.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                   attention_mask=tokens["attention_mask"].to(device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    return embed_in_batches(len(texts), batch_size, embed_batch)


def clap_scores(clap: LoadedClap, audio: np.ndarray, sample_rate: int, captions: Sequence[str],
                batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Per-sample cosine similarity [S] of waveforms [S, T] (or [S, 1, T]) at sample_rate and their captions."""
    audio = resample(mono_waveforms(audio), sample_rate, clap.sampling_rate)
    if len(audio) != len(captions):
        raise ValueError(f"{len(audio)} clips but {len(captions)} captions")
    unique = sorted(set(captions))  # samples share prompts: embed each caption once
    row = {caption: i for i, caption in enumerate(unique)}
    text = embed_texts(clap, unique, batch_size)[[row[c] for c in captions]]
    return pairwise_cosine(embed_audio(clap, audio, batch_size), text).numpy()


# --- metric ----------------------------------------------------------------------------------------

class CLAPScore(Metric):
    """Mean CLAP cosine similarity of audio samples and their prompts (models.yaml `prompts`, `clap`,
    `sample_rate`)."""

    name = "clap_score"
    higher_is_better = True

    def compute(self, ctx: EvalContext) -> MetricValue:
        model_id, spec = ctx.cell["model"], ctx.model_spec
        if "sample_rate" not in spec:
            raise ConfigError(f"key '{model_id}.sample_rate' missing; clap_score needs the rate "
                              f"of the generated audio (samples per second)")
        cfg = spec.get("clap") or {}
        source, cache_dir = str(cfg.get("model", DEFAULT_MODEL)), cfg.get("cache_dir")
        prompts = load_prompts(model_id, spec)
        clap = ctx.memo(f"clap:{source}", lambda: load_clap(source, cache_dir, ctx.device))
        scores = clap_scores(clap, np.asarray(ctx.samples), int(spec["sample_rate"]),
                             recorded_prompts(ctx.prompt_index, prompts, len(ctx.samples), self.name),
                             int(cfg.get("batch_size", DEFAULT_BATCH_SIZE)))
        low, high = bootstrap_interval(scores)
        return MetricValue(float(scores.mean()), low, high, provenance={
            **clap.provenance, "definition": DEFINITION, "sample_rate": int(spec["sample_rate"]),
            "resampled": int(spec["sample_rate"]) != clap.sampling_rate, "num_samples": len(ctx.samples),
            "num_prompts": len(prompts), "prompts_sha256": prompts_sha256(prompts), "std": float(scores.std()),
            **bootstrap_provenance()})
