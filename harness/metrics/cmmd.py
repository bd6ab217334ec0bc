"""CMMD (Jayasumana et al. 2024, "Rethinking FID"): the maximum mean discrepancy between CLIP image embeddings
of the samples and of the reference images, under a Gaussian kernel, through open-clip.

As google-research/cmmd computes it: unit-norm embeddings, k(x, y) = exp(-|x - y|^2 / (2 sigma^2)) with
sigma = 10, MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y) over all pairs (diagonals included, the
V-statistic), times 1000. The paper's embedding is CLIP ViT-L/14 at 336 px (models.yaml `clip: {model:
ViT-L-14-336, pretrained: openai}`); the weights are found as clip_score finds them, never downloaded here. Unlike
FID it assumes no normality and is unbiased in the number of samples only asymptotically (V-statistic), so
compare CMMD at equal sample counts.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.metrics.base import EvalContext, Metric, MetricValue

SIGMA = 10.0
SCALE = 1000.0
DEFINITION = "CMMD: 1000 x Gaussian-kernel (sigma 10) MMD^2 V-statistic of unit-norm CLIP image embeddings"


def mmd(x: torch.Tensor, y: torch.Tensor, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """scale x MMD^2 of the embedding sets x [N, D] and y [M, D] under the Gaussian kernel, in float64."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(a, b):
        return torch.exp(-gamma * torch.cdist(a, b).square()).mean()

    return float(scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y)))


class CMMD(Metric):
    name = "cmmd"
    higher_is_better = False

    def compute(self, ctx: EvalContext) -> MetricValue:
        from harness.metrics.clip_score import clip_settings, embed_images, load_clip
        from harness.metrics.features import data_to_uint8_rgb
        from harness.metrics.refdata import load_reference_images, reference_source

        model_id = ctx.cell["model"]
        settings = clip_settings(ctx.model_spec)
        clip = ctx.memo(f"clip:{settings['model']}:{settings['pretrained']}",
                        lambda: load_clip(settings["model"], settings["pretrained"], settings["cache_dir"], ctx.device))
        source = reference_source(ctx.model_spec, model_id)
        reference = ctx.memo(f"cmmd-reference:{source}", lambda: embed_images(
            clip, load_reference_images(source), settings["batch_size"]))
        samples = embed_images(clip, data_to_uint8_rgb(np.asarray(ctx.samples), settings["data_range"]),
                               settings["batch_size"])
        return MetricValue(mmd(samples, reference), provenance={
            **clip.provenance, "definition": DEFINITION, "num_samples": len(samples),
            "num_reference": len(reference), "reference": source.name})
