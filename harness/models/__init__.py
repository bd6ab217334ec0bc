"""Model adapters: each turns a models.yaml entry into a Denoiser."""

from __future__ import annotations

import torch

from harness.registry import Registry

MODELS: Registry = Registry("model adapter", "harness.models.base:Denoiser")
MODELS.add("gmm2d", "harness.models.analytic:GaussianMixture")
MODELS.add("digits_ideal", "harness.models.analytic:IdealDenoiser")
MODELS.add("diffusers_unet", "harness.models.diffusers_unet:DiffusersUNet")


def resolve_device(device: str | None) -> str:
    """The requested device, else CUDA when present, else CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_denoiser(spec: dict, device: str | torch.device = "cpu"):
    """Build the Denoiser for one validated models.yaml entry."""
    return MODELS.get(spec["adapter"]).from_config(spec, torch.device(device))


def check_model(spec: dict) -> None:
    """A models.yaml entry's cheap checks (files found, configs agreeing), without loading weights."""
    MODELS.get(spec["adapter"]).check_spec(spec)
