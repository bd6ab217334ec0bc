"""Latent text-to-image checkpoints in Stable Diffusion's layout: models.yaml `adapter: diffusers_sd`.

A StableDiffusionPipeline folder (hub id in the Hugging Face cache, or a local save_pretrained folder):
unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), text_encoder/ (CLIPTextModel), tokenizer/ (CLIPTokenizer),
scheduler/. Each is loaded under harness.models.checkpoint's rules (class, every weight, safetensors).

The Denoiser lives in the VAE's latent space (data_shape = the UNet's latent shape, `latent`: samples.npz keeps
the latents, where mse_ref is measured); `decode` is the VAE's decoder on latents / scaling_factor, batched apart
from the network (`params.decode_batch`). The noise process is models.yaml's, checked against the scheduler
config's betas as diffusers_unet does, and the prediction type is the config's (SD 2.x 768: v_prediction).

Conditioning: sample i's caption is prompts[prompt_indices(seed, [i], N)] (harness.metrics.text_alignment: a
seeded permutation per block of N samples, so it depends only on (seed, i)), from models.yaml `prompts` (a list, a
text file with one per line, or a COCO captions JSON); samples.npz records each sample's prompt index, which
clip_score reads. `conditions` encodes a batch's distinct captions once (the
CLIP text encoder's last hidden state, as StableDiffusionPipeline.encode_prompt); the empty caption is the null
condition of classifier-free guidance, as the pipeline's default negative prompt.

    params: {dtype: float32 | float16 | bfloat16, network_batch: rows per UNet call (16; 'auto': the largest that
             fits, harness.models.base.NetworkDenoiser), decode_batch: latents per VAE decode (8), cache_dir,
             allow_pickle: see harness.models.checkpoint, compile: torch.compile the UNet once per process
             (harness.models.compiled)}
"""

from __future__ import annotations

import numpy as np
import torch

from harness.errors import ConfigError
from harness.models.base import (DenoiserInfo, NetworkDenoiser, condition_length, condition_rows, innermost,
                                 network_batch)
from harness.models.checkpoint import load_module, load_tokenizer, locate
from harness.models.compiled import compile_mode, load_network
from harness.models.diffusers_unet import _check_process, _dtype, _prediction
from harness.schedules import make_process

PIPELINES = {"StableDiffusionPipeline"}
PARTS = {"unet": {"UNet2DConditionModel"}, "vae": {"AutoencoderKL"}, "text_encoder": {"CLIPTextModel"}}
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}


def pipeline_files(weights: dict[str, str]) -> list[str]:
    """The files a text pipeline adapter reads, for the `hf download` line of an offline error: the index, the
    scheduler and tokenizer folders, each part's config and its weights file (`weights`: part -> file name)."""
    return ["model_index.json", "scheduler/*", "tokenizer/*"] + [f"{part}/{name}" for part, file in weights.items()
                                                                 for name in ("config.json", file)]


FILES = pipeline_files(WEIGHTS)


class StableDiffusion(NetworkDenoiser):
    @classmethod
    def check_spec(cls, spec: dict) -> None:
        _setup(spec)

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "StableDiffusion":
        return cls.build(spec, device, *_setup(spec))

    @classmethod
    def build(cls, spec: dict, device: torch.device, checkpoint, process, prediction: str, prompts: list[str],
              prepare=None) -> "StableDiffusion":
        """The denoiser from a checked pipeline folder (a subclass's own _setup: diffusers_lcm); `prepare` (see
        compiled.load_network) changes the UNet once loaded, before it is moved or compiled."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        params = spec.get("params", {})
        dtype = _dtype(params.get("dtype", "float32"))
        unet, network = load_network(checkpoint, "unet", UNet2DConditionModel, dtype, device, params, prepare=prepare)
        vae = load_module(checkpoint, "vae", AutoencoderKL, dtype).to(device)
        text_encoder = load_module(checkpoint, "text_encoder", CLIPTextModel, dtype).to(device)
        tokenizer = load_tokenizer(checkpoint, "tokenizer", CLIPTokenizer)
        denoiser = cls.latent_text_denoiser(params, device, checkpoint, unet, network, "unet_call", prediction,
                                            process, prompts, dtype)
        denoiser.vae, denoiser.text_encoder, denoiser.tokenizer = vae, text_encoder, tokenizer
        return denoiser

    @classmethod
    def latent_text_denoiser(cls, params: dict, device: torch.device, checkpoint, module, network, call: str,
                             prediction: str, process, prompts: list[str], dtype: torch.dtype, data_shape=None,
                             **extra) -> "StableDiffusion":
        """What every latent text-conditional adapter's denoiser shares: its DenoiserInfo (data_shape: the network
        config's latent shape unless given; `extra` adds to info.extra), its network run by the method named `call`
        in chunks of params.network_batch, its prompts and decode batch. The adapter adds its encoders and VAE."""
        if data_shape is None:
            size = module.config.sample_size
            data_shape = (module.config.in_channels, *((size, size) if isinstance(size, int) else size))
        info = DenoiserInfo(
            data_shape=tuple(data_shape),
            data_range=(-1.0, 1.0),
            prediction=prediction,
            process=process,
            dtype=dtype,
            device=device,
            latent=True,
            extra={"source": checkpoint.source, "text": True, "num_prompts": len(prompts), **extra},
        )
        denoiser = cls(None, info, module=module, chunk=network_batch(params, 16))
        denoiser.net, denoiser.network = getattr(denoiser, call), network
        denoiser.prompts, denoiser.decode_batch = prompts, int(params.get("decode_batch", 8))
        denoiser._null = None
        return denoiser

    @torch.inference_mode()
    def unet_call(self, x_t, t, cond=None):
        """The UNet's prediction; no condition is the unconditional model (the empty caption)."""
        cond = self.null_condition(x_t) if cond is None else cond
        return self.network(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]

    # ---- text conditioning ----

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """CLIP text embeddings [len(captions), tokens, width], as StableDiffusionPipeline.encode_prompt."""
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.info.device)
        return self.text_encoder(ids)[0].to(self.info.dtype)

    def conditions(self, seed, indices):
        from harness.metrics.text_alignment import prompt_indices

        which = prompt_indices(seed, indices, len(self.prompts))
        distinct, rows = np.unique(which, return_inverse=True)  # each caption of the batch encoded once
        embeddings = self.encode([self.prompts[k] for k in distinct])  # a tensor, or a dict of them (SD3)
        return condition_rows(embeddings, torch.as_tensor(rows, device=self.info.device))

    def condition_record(self, seed, num_samples):
        from harness.metrics.text_alignment import prompt_indices

        return {"prompt_index": prompt_indices(seed, range(num_samples), len(self.prompts))}

    def null_condition(self, cond):
        if self._null is None:
            self._null = self.encode([""])
        return condition_rows(self._null, [0] * condition_length(cond))

    def condition_mismatch(self, other):
        """Another text model takes this one's conditions (a stitched pair: BK-SDM beside SD 1.5) when it has the
        same prompts and its text encoder gives the same embeddings, checked on the first caption and the null."""
        other = innermost(other)
        if type(other) is not type(self):
            return f"it is a {type(other).__name__}, not a {type(self).__name__}"
        if other.prompts != self.prompts:
            return "its prompts differ"
        probe = [self.prompts[0], ""]
        mine, theirs = self.encode(probe), other.encode(probe)
        if isinstance(mine, dict):  # SDXL's, SD3's
            same = mine.keys() == theirs.keys() and all(_equal(mine[k], theirs[k]) for k in mine)
        else:
            same = _equal(mine, theirs)
        return None if same else "its text encoder gives other embeddings of the same captions"

    # ---- latents to images ----

    def decode(self, z0):
        return vae_decode(self.vae, z0, self.decode_batch, self.info.dtype)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


@torch.inference_mode()
def vae_decode(vae, z0: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """Images from latents through an AutoencoderKL, `batch` latents per call (apart from the network's batch:
    the decoder at full resolution needs more memory per row)."""
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    return torch.cat([vae.decode(z0[start:start + batch].to(dtype) / scale + shift, return_dict=False)[0]
                      for start in range(0, len(z0), batch)])


def _setup(spec: dict):
    """(checkpoint, process, prediction, prompts) from the config files and the prompt file alone."""
    checkpoint, process, scheduler_config, prompts = check_text_pipeline(spec, "diffusers_sd", PIPELINES, PARTS,
                                                                          ("tokenizer",), FILES)
    _check_process(checkpoint.source, process, scheduler_config)
    prediction = _prediction(checkpoint.source, scheduler_config, spec.get("params", {}).get("prediction"))
    return checkpoint, process, prediction, prompts


def check_text_pipeline(spec: dict, adapter: str, pipelines: set[str], parts: dict[str, set[str]],
                        tokenizers: tuple[str, ...], files: list[str]):
    """The planning checks every text-to-image pipeline adapter makes, from config files and the prompt file:
    the folder is one of `pipelines`, each of `parts` (subfolder -> classes) has its class and safetensors weights,
    the tokenizer folders exist, the entry gives prompts (not classes). (checkpoint, process, scheduler config,
    prompts); the adapter checks the process against the scheduler config."""
    from harness.metrics.text_alignment import load_prompts

    checkpoint = locate(spec, adapter, files)
    _dtype(spec.get("params", {}).get("dtype", "float32"))
    compile_mode(spec.get("params", {}), checkpoint.source)
    network_batch(spec.get("params", {}), 16)
    if checkpoint.check_pipeline(pipelines) is None:
        layout = ", ".join(f"{folder}/" for folder in (*parts, *tokenizers, "scheduler"))
        raise ConfigError(f"{adapter}: {checkpoint.source} has no model_index.json; it needs a "
                          f"{' or '.join(sorted(pipelines))} folder ({layout})")
    for part, classes in parts.items():
        checkpoint.check_class(part, classes)
        checkpoint.weights(part)
    for folder in tokenizers:
        checkpoint.folder(folder)
    if spec.get("classes"):
        raise ConfigError(f"{adapter}: {checkpoint.source} is text-conditional; its entry takes `prompts`, "
                          f"not `classes`")
    prompts = load_prompts(checkpoint.source, spec)
    scheduler_config = checkpoint.config("scheduler", "scheduler_config.json")
    return checkpoint, make_process(spec["process"]), scheduler_config, prompts
