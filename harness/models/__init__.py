"""Model adapters: each turns a models.yaml entry into a Denoiser."""

from __future__ import annotations

import torch

from harness.registry import Registry

MODELS: Registry = Registry("model adapter", "harness.models.base:Denoiser")
MODELS.add("gmm2d", "harness.models.analytic:GaussianMixture")
MODELS.add("digits_ideal", "harness.models.analytic:IdealDenoiser")
MODELS.add("digits_gaussian", "harness.models.analytic:GaussianData")
MODELS.add("diffusers_unet", "harness.models.diffusers_unet:DiffusersUNet")
MODELS.add("diffusers_sd", "harness.models.diffusers_sd:StableDiffusion")
MODELS.add("diffusers_dit", "harness.models.diffusers_dit:DiffusersDiT")
MODELS.add("diffusers_sd3", "harness.models.diffusers_sd3:StableDiffusion3")
MODELS.add("diffusers_sdxl", "harness.models.diffusers_sdxl:StableDiffusionXL")
MODELS.add("diffusers_lcm", "harness.models.diffusers_lcm:LatentConsistency")
MODELS.add("diffusers_audioldm", "harness.models.diffusers_audioldm:AudioLDM")
MODELS.add("tarflow", "harness.models.flow:TarFlowModel")

# Adapters whose models are normalizing flows (harness.models.flow), sampled by inversion, not by denoising:
# the one place a model's kind is decided, from its entry alone (planning imports no adapter for it).
FLOW_ADAPTERS = ("tarflow",)


def model_kind(spec: dict) -> str:
    """'flow' or 'denoiser': which methods can sample a models.yaml entry (Sampler.model_kind)."""
    return "flow" if spec["adapter"] in FLOW_ADAPTERS else "denoiser"


def guidance_refusal(spec: dict) -> str | None:
    """Why grid guidance cannot apply to a models.yaml entry (an LCM has its guidance in the network), or None;
    the adapter's Denoiser.guidance_refusal, asked while the grid is planned and again by the cell."""
    return None if "train" in spec else MODELS.get(spec["adapter"]).guidance_refusal(spec)


def resolve_device(device: str | None) -> str:
    """The requested device, else CUDA when present, else CPU."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_denoiser(spec: dict, device: str | torch.device = "cpu", cache_dir=None, model_id: str = "this model"):
    """Build the Denoiser for one validated models.yaml entry; a model the workflow trains loads from its
    folder in `cache_dir` (harness.training)."""
    return MODELS.get(spec["adapter"]).from_config(with_source(spec, cache_dir, model_id), torch.device(device))


def check_model(spec: dict) -> None:
    """A models.yaml entry's cheap checks (files found, configs agreeing), without loading weights; a model
    the workflow trains has nothing to check before its training job."""
    if "train" not in spec:
        MODELS.get(spec["adapter"]).check_spec(spec)


def with_source(spec: dict, cache_dir, model_id: str) -> dict:
    """A trained entry with `source` set to the folder its training wrote."""
    if "train" not in spec:
        return spec
    from harness.training import trained_source

    return {**spec, "source": str(trained_source(spec, cache_dir, model_id))}
