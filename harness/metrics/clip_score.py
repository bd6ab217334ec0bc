"""CLIP score of text-conditional image samples against their prompts, through open-clip.

Definition (CLIPScore, Hessel et al. 2021, with w = 100 as torchmetrics' `CLIPScore` uses it): for
each sample, 100 * max(cos(E_image, E_text), 0) with the model's projected embeddings; the metric is
the mean over samples, with a percentile-bootstrap interval over the per-sample scores.

Pipeline as pure functions: samples in the model's data range -> uint8 RGB (as saved images would be)
-> open-clip's eval preprocessing for the model (the transform `create_model_and_transforms` returns:
PIL resize, crop, normalise) -> embeddings -> per-sample scores.

Weights: `clip.pretrained` is an open-clip tag, looked up in open-clip's caches first (the Hugging
Face hub cache, or ~/.cache/clip for URL weights) and downloaded only when the hub is online, or the
path of a local checkpoint file; both load through `open_clip.create_model`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from harness.errors import ConfigError, StepbenchError
from harness.metrics.base import EvalContext, Metric, MetricValue
from harness.metrics.features import data_to_uint8_rgb, file_sha256
from harness.metrics.text_alignment import (bootstrap_interval, bootstrap_provenance, clip_score_from_cosine,
                                            downloads_allowed, embed_in_batches, hf_cache_dir, load_prompts,
                                            missing_weights, pairwise_cosine, prompts_sha256, recorded_prompts)

# torchmetrics' default CLIP (openai/clip-vit-large-patch14) under its open-clip name, so scores compare
DEFAULT_MODEL = "ViT-L-14"
DEFAULT_PRETRAINED = "openai"
DEFAULT_DATA_RANGE = (-1.0, 1.0)  # diffusers' image convention
DEFAULT_BATCH_SIZE = 64
DEFINITION = "mean over samples of 100 * max(cos(image_emb, text_emb), 0) (CLIPScore, Hessel et al. 2021; torchmetrics)"


@dataclass
class LoadedClip:
    model: Any  # open_clip.model.CLIP (or CustomTextCLIP), eval mode
    tokenizer: Any  # callable: list[str] -> LongTensor [N, context_length]
    preprocess: dict  # open-clip PreprocessCfg as a dict: size, mean, std, interpolation, resize_mode, fill_color
    provenance: dict


# --- weights -----------------------------------------------------------------------------------------

def resolve_checkpoint(model_name: str, pretrained: str, cache_dir: str | None = None) -> tuple[Path, dict]:
    """A local checkpoint file for (model, tag or path), and the tag's open-clip config ({} for a path).

    Caches are read first so that an offline machine with the weights never touches the network.
    """
    import open_clip

    if Path(pretrained).expanduser().is_file():
        return Path(pretrained).expanduser(), {}
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        if os.sep in pretrained or Path(pretrained).suffix:
            raise missing_weights(f"CLIP {model_name}", f"the file {pretrained}")
        raise ConfigError(f"CLIP model {model_name!r}: pretrained {pretrained!r} is neither a file nor a tag; "
                          f"tags: {', '.join(tags) or '(none)'}")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if "file" in cfg:
        return Path(cfg["file"]), cfg
    cached, where = _cached_checkpoint(cfg, cache_dir)
    if cached is not None:
        return cached, cfg
    if not downloads_allowed():
        raise missing_weights(f"CLIP {model_name}/{pretrained}", where)
    try:
        return Path(open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir)), cfg
    except Exception as err:  # network, auth, disk: one line either way
        raise missing_weights(f"CLIP {model_name}/{pretrained}", where, err) from None


def _cached_checkpoint(cfg: dict, cache_dir: str | None) -> tuple[Path | None, str]:
    """Where open-clip's download would have put the tag's file, if it is there."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    places = []
    if cfg.get("hf_hub"):
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        # open-clip prefers a safetensors twin of a pickled checkpoint when the repo has one
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else (
            filename.rsplit(".", 1)[0] + ".safetensors" if filename.endswith((".bin", ".pth")) else None)
        for name in [n for n in (safe, filename) if n]:
            try:
                return Path(hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=True)), ""
            except Exception:  # not cached
                continue
        places.append(f"the Hugging Face cache {hf_cache_dir(cache_dir)} (repo {repo}, file {filename})")
    if cfg.get("url"):
        path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if path.is_file():
            return path, ""
        places.append(str(path))
    return None, " and ".join(places) or "(no download source in open-clip's config)"


def load_clip(model_name: str = DEFAULT_MODEL, pretrained: str = DEFAULT_PRETRAINED, cache_dir: str | None = None,
              device: str = "cpu") -> LoadedClip:
    import open_clip

    if model_name not in open_clip.list_models():
        raise ConfigError(f"CLIP model {model_name!r} unknown to open-clip {open_clip.__version__}; "
                          f"see open_clip.list_models()")
    checkpoint, tag_cfg = resolve_checkpoint(model_name, pretrained, cache_dir)
    # A tag's preprocessing and activation live in its config, not in the checkpoint: pass them on,
    # as create_model does itself when it is given the tag.
    preprocess_keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
    model = open_clip.create_model(
        model_name, pretrained=str(checkpoint), device=device, force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
        force_preprocess_cfg={k: tag_cfg[k] for k in preprocess_keys if k in tag_cfg}, cache_dir=cache_dir)
    model.eval()
    try:
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    except Exception as err:  # Hugging Face tokenizers of some models come from the hub
        raise missing_weights(f"CLIP {model_name} tokenizer", hf_cache_dir(cache_dir), err) from None
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    provenance = {"clip_model": model_name, "pretrained": pretrained, "checkpoint_sha256": file_sha256(checkpoint),
                  "open_clip_version": open_clip.__version__,
                  "preprocess": {k: preprocess[k] for k in ("size", "interpolation", "resize_mode") if k in preprocess}}
    return LoadedClip(model, tokenizer, preprocess, provenance)


# --- images -> CLIP input ------------------------------------------------------------------------------

def preprocess_images(pixels: torch.Tensor, cfg: dict) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, h, w] through open-clip's own eval transform for `cfg`.

    The transform runs on PIL images, as it does for users scoring saved PNGs: torchvision's tensor
    resize differs from PIL's by up to ~16 uint8 levels on textured images, which would move scores
    away from everyone else's.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected uint8 [N, 3, H, W]; got {pixels.dtype} {list(pixels.shape)}")
    fields = PreprocessCfg.__dataclass_fields__
    transform = image_transform_v2(PreprocessCfg(**{k: v for k, v in cfg.items() if k in fields}), is_train=False)
    images = pixels.permute(0, 2, 3, 1).numpy()
    return torch.stack([transform(Image.fromarray(image)) for image in images])


# --- embeddings and scores -------------------------------------------------------------------------

def embed_images(clip: LoadedClip, pixels: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> unit-norm image embeddings [N, D] (float32, CPU)."""
    device = next(clip.model.parameters()).device
    return embed_in_batches(len(pixels), batch_size, lambda start, stop: clip.model.encode_image(
        preprocess_images(pixels[start:stop], clip.preprocess).to(device), normalize=True))


def embed_texts(clip: LoadedClip, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Captions -> unit-norm text embeddings [N, D]; the tokenizer truncates at the context length."""
    device = next(clip.model.parameters()).device
    return embed_in_batches(len(texts), batch_size, lambda start, stop: clip.model.encode_text(
        clip.tokenizer(list(texts[start:stop])).to(device), normalize=True))


def clip_scores(clip: LoadedClip, pixels: torch.Tensor, captions: Sequence[str],
                batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Per-sample CLIPScore [N] of uint8 images against their captions (one caption per image)."""
    if len(pixels) != len(captions):
        raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
    unique = sorted(set(captions))  # samples share prompts: embed each caption once
    row = {caption: i for i, caption in enumerate(unique)}
    text = embed_texts(clip, unique, batch_size)[[row[c] for c in captions]]
    cosine = pairwise_cosine(embed_images(clip, pixels, batch_size), text)
    return clip_score_from_cosine(cosine).numpy()


# --- metric ----------------------------------------------------------------------------------------

def clip_settings(spec: dict) -> dict:
    cfg = spec.get("clip") or {}
    return {"model": cfg.get("model", DEFAULT_MODEL), "pretrained": str(cfg.get("pretrained", DEFAULT_PRETRAINED)),
            "cache_dir": cfg.get("cache_dir"), "data_range": tuple(cfg.get("data_range", DEFAULT_DATA_RANGE)),
            "batch_size": int(cfg.get("batch_size", DEFAULT_BATCH_SIZE))}


class CLIPScore(Metric):
    """Mean CLIPScore (0..100) of the samples against their prompts (models.yaml `prompts`, `clip`)."""

    name = "clip_score"
    higher_is_better = True

    def compute(self, ctx: EvalContext) -> MetricValue:
        model_id = ctx.cell["model"]
        settings = clip_settings(ctx.model_spec)
        prompts = load_prompts(model_id, ctx.model_spec)
        samples = np.asarray(ctx.samples)
        if samples.ndim != 4 or samples.shape[1] not in (1, 3):
            raise StepbenchError(f"clip_score needs image samples [S, 1 or 3, H, W]; model {model_id!r} "
                                 f"has {list(samples.shape)}")
        clip = ctx.memo(f"clip:{settings['model']}:{settings['pretrained']}",
                        lambda: load_clip(settings["model"], settings["pretrained"], settings["cache_dir"], ctx.device))
        pixels = data_to_uint8_rgb(samples, settings["data_range"])
        captions = recorded_prompts(ctx.prompt_index, prompts, len(samples), self.name)  # the cell's own
        scores = clip_scores(clip, pixels, captions, settings["batch_size"])
        low, high = bootstrap_interval(scores)
        return MetricValue(float(scores.mean()), low, high, provenance={
            **clip.provenance, "definition": DEFINITION, "data_range": list(settings["data_range"]),
            "num_samples": len(samples), "num_prompts": len(prompts), "prompts_sha256": prompts_sha256(prompts),
            "std": float(scores.std()), **bootstrap_provenance()})
