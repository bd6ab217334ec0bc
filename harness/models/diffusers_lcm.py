"""Latent consistency models (Luo et al. 2023) in Stable Diffusion's layout: models.yaml `adapter: diffusers_lcm`.

Both kinds are diffusers_sd's folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, each loaded under
harness.models.checkpoint's rules), with its prompts, conditions, null condition and VAE decoder:
- an LCM: a LatentConsistencyModelPipeline folder (SimianLuo/LCM_Dreamshaper_v7) whose UNet has time_cond_proj_dim.
  The guidance scale w it was distilled with is an input of the network: LatentConsistencyModelPipeline's
  embedding of w - 1 (sin and cos of 1000 (w - 1), time_cond_proj_dim wide) goes in as timestep_cond with every
  call; w is `params.lcm_guidance` (8.5, the pipeline's default). Guidance is the network's, so the grid's guidance
  axis does not apply: its cells at a scale other than 1 are n/a at planning, and run_cell refuses them
  (Denoiser.guidance_refusal). The unconditional call (cond None) is the empty caption at the same w.
- an LCM-LoRA: an ordinary StableDiffusionPipeline folder (stable-diffusion-v1-5) with `params.lora`, a LoRA of its
  UNet (latent-consistency/lcm-lora-sdv1-5) that diffusers' LoRA loader (peft) injects and that is then fused into
  the weights, as pipe.load_lora_weights + fuse_lora do. Every tensor of the LoRA file must land in a UNet layer
  and load, else the load is refused; at planning the file's keys must all be the UNet's (the header, without
  loading it). Its UNet has no guidance input: LCM-LoRA is run at guidance 1 (no CFG), and a grid guidance scale
  is classifier-free guidance of the x0 prediction as on diffusers_sd (c_skip and c_out are the same for both
  passes, so this is StableDiffusionPipeline's CFG on eps through LCMScheduler.step).

Either way the Denoiser is LCMScheduler.step's consistency function, so every procedure sees it:
x0 = c_skip(t) x_t + c_out(t) x0_net(x_t, t) on the unscaled x_t, with c_skip = sigma_data^2 / ((s t)^2 +
sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2), s the scheduler config's timestep_scaling (LCMScheduler's
default 10 where the config has none: an SD scheduler) and sigma_data = 0.5 (LCMScheduler's constant; no config
key), x0_net the network's x0 by its prediction type. LCMScheduler's own sampling is methods.yaml `lcm_timesteps`.

    params: diffusers_sd's (dtype, network_batch, decode_batch, cache_dir, allow_pickle, compile), and
            lcm_guidance: w of an LCM's guidance embedding (8.5); lora: {source: hub id or local folder of the LoRA,
            weight_name: its file (pytorch_lora_weights.safetensors)}, safetensors unless allow_pickle
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.errors import ConfigError
from harness.models.base import _bcast
from harness.models.checkpoint import PICKLE_SUFFIXES, locate
from harness.models.diffusers_sd import FILES, PARTS, StableDiffusion, check_text_pipeline
from harness.models.diffusers_unet import _check_process, _prediction

LCM_PIPELINE = "LatentConsistencyModelPipeline"
PIPELINES = {LCM_PIPELINE, "StableDiffusionPipeline"}  # an LCM, or SD for an LCM-LoRA
SIGMA_DATA = 0.5  # LCMScheduler.get_scalings_for_boundary_condition_discrete sets it; no config key
DEFAULT_GUIDANCE = 8.5  # LatentConsistencyModelPipeline's guidance_scale
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name (save_lora_weights)
LORA_KEYS = ("unet.", "lora_unet_")  # a UNet LoRA: diffusers' prefix, or kohya's (converted by diffusers)
ADAPTER = "stepbench_lcm"  # the peft adapter's name while it is loaded, before it is fused


@dataclass(frozen=True)
class LCMSettings:
    guidance: float | None  # an LCM's w; None for an LCM-LoRA (no guidance embedding)
    embedding_dim: int | None  # the UNet's time_cond_proj_dim
    timestep_scaling: float
    lora: Path | None  # the LoRA file to fuse
    lora_where: str = ""


class LatentConsistency(StableDiffusion):
    @classmethod
    def check_spec(cls, spec: dict) -> None:
        _setup(spec)

    @classmethod
    def guidance_refusal(cls, spec: dict) -> str | None:
        # without params.lora the entry is an LCM (check_spec: its UNet has the guidance embedding)
        if spec.get("params", {}).get("lora") is None:
            return "guidance is in the LCM network (params.lcm_guidance)"
        return None

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "LatentConsistency":
        checkpoint, process, prediction, prompts, lcm = _setup(spec)
        prepare = None
        if lcm.lora is not None:
            stat = lcm.lora.stat()
            prepare = ((str(lcm.lora.resolve()), stat.st_size, stat.st_mtime_ns),
                       lambda unet: fuse_lora(unet, lcm.lora, lcm.lora_where, checkpoint.source))
        denoiser = cls.build(spec, device, checkpoint, process, prediction, prompts, prepare)
        denoiser.timestep_scaling = lcm.timestep_scaling
        denoiser.guidance_embedding = None
        if lcm.guidance is not None:
            denoiser.guidance_embedding = guidance_embedding(lcm.guidance, lcm.embedding_dim).to(
                device=device, dtype=denoiser.info.dtype)
        return denoiser

    @torch.inference_mode()
    def unet_call(self, x_t, t, cond=None):
        """The UNet's prediction, an LCM's at its guidance embedding; no condition is the empty caption."""
        if self.guidance_embedding is None:  # an LCM-LoRA: an SD UNet
            return super().unet_call(x_t, t, cond)
        cond = self.null_condition(x_t) if cond is None else cond
        embedding = self.guidance_embedding.expand(len(x_t), -1)
        return self.network(x_t, t, encoder_hidden_states=cond, timestep_cond=embedding, return_dict=False)[0]

    def denoise(self, x, sigma, cond=None):
        """The consistency function: LCMScheduler's boundary condition on the network's x0 (c_skip mixes back the
        unscaled x_t = alpha x~)."""
        x0 = super().denoise(x, sigma, cond)
        sig = sigma.detach().cpu().double().numpy()
        c_skip, c_out = boundary_scalings(self.process.t(sig), self.timestep_scaling)
        skip = torch.as_tensor(c_skip * self.process.alpha(sig), dtype=x.dtype, device=x.device)
        out = torch.as_tensor(c_out, dtype=x.dtype, device=x.device)
        return _bcast(skip, x) * x + _bcast(out, x) * x0


def boundary_scalings(t, timestep_scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) at native timesteps t, as LCMScheduler.get_scalings_for_boundary_condition_discrete."""
    scaled = np.asarray(t, dtype=np.float64) * timestep_scaling
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / np.sqrt(scaled**2 + SIGMA_DATA**2)


def guidance_embedding(w: float, dim: int) -> torch.Tensor:
    """[1, dim]: LatentConsistencyModelPipeline's embedding of guidance scale w, of w - 1 (it uses Imagen's
    convention, the LCM paper's w' = w - 1): sin and cos of 1000 (w - 1) at dim // 2 frequencies
    10000^(-k / (dim // 2 - 1)), zero-padded to an odd dim; in float32 operation by operation as the pipeline, as
    the angles are large (7500 rad at w 8.5) and an ulp of them moves the sines."""
    half = dim // 2
    scaled = torch.tensor([w - 1.0], dtype=torch.float32) * 1000.0
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = scaled[:, None] * frequencies[None, :]
    return torch.nn.functional.pad(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1), (0, dim % 2))


def fuse_lora(unet, path: Path, where: str, source: str):
    """The LoRA file fused into `unet` with diffusers' loader (StableDiffusionPipeline.lora_state_dict converts
    kohya keys, load_lora_into_unet injects peft layers; then fuse and unload, keeping the fused weights). Refused
    unless every tensor of the file is one of the injected layers' and loaded."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = read_lora(path, where)
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(state)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"diffusers_lcm: the LoRA {where} cannot be read by diffusers: {_first_line(err)}") from None
    outside = sorted(k for k in state if not k.startswith("unet.") or "lora" not in k)
    if outside or not state:
        raise ConfigError(f"diffusers_lcm: the LoRA {where} has {len(outside)} keys that are not LoRA weights of the "
                          f"UNet (first: {outside[0] if outside else 'none at all'}); stepbench fuses a UNet LoRA only")
    ours = {k.removeprefix("unet."): v for k, v in state.items()}
    # the keys peft sees, as UNet2DConditionModel.load_lora_adapter converts them (lora.down -> lora_A, ...)
    expected = ours if "lora_A" in next(iter(ours)) else convert_unet_state_dict_to_peft(ours)
    try:
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name=ADAPTER)
    except (ValueError, RuntimeError, KeyError) as err:  # a mis-shaped tensor, a layer peft cannot wrap
        raise ConfigError(f"diffusers_lcm: the LoRA {where} does not fit {source}'s UNet: {_first_line(err)}") from None
    loaded = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            for part in ("lora_A", "lora_B"):
                layers = getattr(module, part, {})
                if ADAPTER in layers:
                    loaded.update({f"{name}.{part}.{p}": v for p, v in layers[ADAPTER].named_parameters()})
    unmatched = sorted(set(expected) - set(loaded))
    unloaded = sorted(k for k in loaded if k not in expected
                      or not torch.equal(loaded[k].detach(), expected[k].to(loaded[k].dtype)))
    if unmatched or unloaded:
        what = (f"{len(unmatched)} of its tensors match no layer of {source}'s UNet (first: {unmatched[0]})"
                if unmatched else f"{len(unloaded)} injected LoRA weights were not loaded from it (first: {unloaded[0]})")
        raise ConfigError(f"diffusers_lcm: the LoRA {where}: {what}; refusing to sample a partly applied LoRA")
    unet.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER])
    unet.unload_lora()  # the peft layers removed, their fused base weights kept
    return unet


def read_lora(path: Path, where: str) -> dict[str, torch.Tensor]:
    """The LoRA file's tensors: safetensors, or (allowed at planning) a pickle through torch.load(weights_only)."""
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a truncated or foreign file: each library raises its own)
        raise ConfigError(f"diffusers_lcm: the LoRA {where} cannot be read: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _setup(spec: dict):
    """(checkpoint, process, prediction, prompts, LCMSettings) from the config files, the prompt file and the LoRA
    file's header alone."""
    checkpoint, process, scheduler_config, prompts = check_text_pipeline(spec, "diffusers_lcm", PIPELINES, PARTS,
                                                                          ("tokenizer",), FILES)
    source, params = checkpoint.source, spec.get("params", {})
    _check_process(source, process, scheduler_config)
    prediction = _prediction(source, scheduler_config, params.get("prediction"))
    for key in ("clip_sample", "thresholding"):
        if scheduler_config.get(key):
            raise ConfigError(f"{source}: the scheduler config sets {key}; LCMScheduler would clamp its x0 before the "
                              f"boundary condition, which stepbench does not")
    scaling = scheduler_config.get("timestep_scaling", 10.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or scaling <= 0:
        raise ConfigError(f"{source}: the scheduler config's timestep_scaling is a positive number, not {scaling!r}")
    embedding_dim = checkpoint.config("unet").get("time_cond_proj_dim")
    pipeline = checkpoint.pipeline["_class_name"]
    lora = params.get("lora")
    if lora is None:
        if pipeline != LCM_PIPELINE:
            raise ConfigError(f"diffusers_lcm: {source} is a {pipeline} folder, not an LCM ({LCM_PIPELINE}); with "
                              f"params.lora it is the base of an LCM-LoRA, else adapter diffusers_sd takes it")
        if not embedding_dim:
            raise ConfigError(f"diffusers_lcm: {source}'s UNet has no guidance embedding (time_cond_proj_dim), which "
                              f"an LCM's takes")
        guidance = params.get("lcm_guidance", DEFAULT_GUIDANCE)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 1:
            raise ConfigError(f"{source}: params.lcm_guidance is the LCM's guidance scale w >= 1 (its embedding takes "
                              f"w - 1; {DEFAULT_GUIDANCE:g} is the pipeline's default), not {guidance!r}")
        return checkpoint, process, prediction, prompts, LCMSettings(float(guidance), int(embedding_dim),
                                                                     float(scaling), None)
    if pipeline == LCM_PIPELINE or embedding_dim:
        raise ConfigError(f"diffusers_lcm: {source} is an LCM already ({pipeline}, its UNet's time_cond_proj_dim "
                          f"{embedding_dim}); params.lora fuses an LCM-LoRA into an ordinary SD pipeline")
    if "lcm_guidance" in params:
        raise ConfigError(f"{source}: params.lcm_guidance sets an LCM's guidance embedding, which this UNet has none "
                          f"of (time_cond_proj_dim); an LCM-LoRA takes the grid's guidance (1: none)")
    path, where = _lora_file(lora, params, source)
    return checkpoint, process, prediction, prompts, LCMSettings(None, None, float(scaling), path, where)


def _lora_file(lora, params: dict, source: str) -> tuple[Path, str]:
    """The LoRA file params.lora names, found without a download, in the format rules, its keys the UNet's."""
    if (not isinstance(lora, dict) or set(lora) - {"source", "weight_name"} or not isinstance(lora.get("source"), str)
            or not isinstance(lora.get("weight_name", LORA_FILE), str)):
        raise ConfigError(f"{source}: params.lora is {{source: hub id or folder of the LoRA, weight_name: its file "
                          f"({LORA_FILE})}}, not {lora!r}")
    name = lora.get("weight_name", LORA_FILE)
    allow_pickle = params.get("allow_pickle", False)
    if not name.endswith(".safetensors"):
        if not name.endswith(PICKLE_SUFFIXES):
            raise ConfigError(f"{source}: params.lora.weight_name {name!r} is not a .safetensors file")
        if allow_pickle is not True:
            raise ConfigError(f"{source}: the LoRA {name} is a pickle (loading one can run code); convert it to "
                              f"safetensors, or set params.allow_pickle: true to load it with "
                              f"torch.load(weights_only=True)")
    folder = locate({"source": lora["source"], "params": {k: params[k] for k in ("allow_pickle", "cache_dir")
                                                          if k in params}}, "diffusers_lcm", [name])
    path, where = folder.root / name, f"{lora['source']}/{name}"
    if not path.is_file():
        raise ConfigError(f"diffusers_lcm: {lora['source']} has no {name}{folder.hint}")
    if name.endswith(".safetensors"):  # its header names the keys; the tensors are read when the cell loads it
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"diffusers_lcm: the LoRA {where} cannot be read: {_first_line(err)}") from None
        outside = sorted(k for k in keys if not k.startswith(LORA_KEYS))
        if outside or not keys:
            raise ConfigError(f"diffusers_lcm: the LoRA {where} has {len(outside)} keys that are not the UNet's "
                              f"(first: {outside[0] if outside else 'none at all'}); stepbench fuses a UNet LoRA only")
    return path, where
