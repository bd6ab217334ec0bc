"""Class-conditional latent DiT checkpoints (Peebles & Xie 2023): models.yaml `adapter: diffusers_dit`.

A DiTPipeline folder (facebook/DiT-XL-2-256 in the Hugging Face cache, or a local save_pretrained folder):
transformer/ (DiTTransformer2DModel; older folders say Transformer2DModel), vae/ (AutoencoderKL), scheduler/,
each loaded under harness.models.checkpoint's rules. The network predicts eps and, with a learned sigma
(out_channels = 2 x in_channels), its variance after it: the Denoiser takes the first half. Samples live in the
VAE's latent space (kept for mse_ref); `decode` is the VAE decoder, as diffusers_sd's.

Class labels 0 .. num_embeds_ada_norm - 1 are the Denoiser's `cond` (balanced from (seed, i), harness.labels);
label num_embeds_ada_norm is the null class DiT was trained with (label dropout), the unconditional half of
classifier-free guidance, as DiTPipeline uses it. The entry's `classes` must state the number of classes.

    params: {dtype, network_batch (16), decode_batch (8), cache_dir, allow_pickle, compile (the transformer, once per
             process: harness.models.compiled)}
"""

from __future__ import annotations

import torch

from harness.errors import ConfigError
from harness.models.base import DenoiserInfo, NetworkDenoiser, network_batch
from harness.models.checkpoint import load_module, locate
from harness.models.compiled import compile_mode, load_network
from harness.models.diffusers_sd import vae_decode
from harness.models.diffusers_unet import _check_process, _dtype, _prediction
from harness.schedules import make_process

PIPELINES = {"DiTPipeline"}
PARTS = {"transformer": {"DiTTransformer2DModel", "Transformer2DModel"}, "vae": {"AutoencoderKL"}}
FILES = ["model_index.json", "scheduler/*"] + [f"{part}/{name}" for part in PARTS
                                               for name in ("config.json", "diffusion_pytorch_model.safetensors")]


class DiffusersDiT(NetworkDenoiser):
    @classmethod
    def check_spec(cls, spec: dict) -> None:
        _setup(spec)

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "DiffusersDiT":
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        params = spec.get("params", {})
        checkpoint, process, prediction, config = _setup(spec)
        dtype = _dtype(params.get("dtype", "float32"))
        transformer, network = load_network(checkpoint, "transformer", DiTTransformer2DModel, dtype, device, params)
        vae = load_module(checkpoint, "vae", AutoencoderKL, dtype).to(device)
        channels, size = transformer.config.in_channels, transformer.config.sample_size
        classes = transformer.config.num_embeds_ada_norm
        info = DenoiserInfo(data_shape=(channels, size, size), data_range=(-1.0, 1.0), prediction=prediction,
                            process=process, dtype=dtype, device=device, latent=True, num_classes=classes,
                            null_class=classes, extra={"source": checkpoint.source})

        @torch.inference_mode()
        def net(x_t, t, cond=None):
            labels = cond if cond is not None else torch.full((len(x_t),), classes, device=x_t.device)
            out = network(x_t, timestep=t, class_labels=labels, return_dict=False)[0]
            return out[:, :channels]  # a learned sigma follows the eps channels

        denoiser = cls(net, info, module=transformer, chunk=network_batch(params, 16))
        denoiser.vae, denoiser.decode_batch = vae, int(params.get("decode_batch", 8))
        return denoiser

    def decode(self, z0):
        return vae_decode(self.vae, z0, self.decode_batch, self.info.dtype)


def _setup(spec: dict):
    params = spec.get("params", {})
    checkpoint = locate(spec, "diffusers_dit", FILES)
    _dtype(params.get("dtype", "float32"))
    compile_mode(params, checkpoint.source)
    network_batch(params, 16)
    if checkpoint.check_pipeline(PIPELINES) is None:
        raise ConfigError(f"diffusers_dit: {checkpoint.source} has no model_index.json; it needs a DiTPipeline "
                          f"folder (transformer/, vae/, scheduler/)")
    configs = {part: checkpoint.check_class(part, classes) for part, classes in PARTS.items()}
    for part in PARTS:
        checkpoint.weights(part)
    classes = configs["transformer"].get("num_embeds_ada_norm")
    if spec.get("classes") != classes:
        raise ConfigError(f"diffusers_dit: {checkpoint.source}'s transformer has {classes} classes (and a null "
                          f"class after them); the models.yaml entry says classes: {spec.get('classes', 'none')}")
    scheduler_config = checkpoint.config("scheduler", "scheduler_config.json")
    process = make_process(spec["process"])
    _check_process(checkpoint.source, process, scheduler_config)
    return checkpoint, process, _prediction(checkpoint.source, scheduler_config, params.get("prediction")), configs
