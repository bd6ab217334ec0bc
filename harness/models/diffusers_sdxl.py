"""Stable Diffusion XL (Podell et al. 2023): models.yaml `adapter: diffusers_sdxl`.

A StableDiffusionXLPipeline folder (stabilityai/stable-diffusion-xl-base-1.0 or stabilityai/sdxl-turbo in the Hugging
Face cache, or a local save_pretrained folder): unet/ (UNet2DConditionModel with addition_embed_type text_time),
vae/ (AutoencoderKL), text_encoder/ (CLIPTextModel, CLIP ViT-L), text_encoder_2/ (CLIPTextModelWithProjection,
OpenCLIP bigG), tokenizer/ and tokenizer_2/ (CLIPTokenizer), scheduler/. Each network is loaded under
harness.models.checkpoint's rules (class, every weight, safetensors).

The noise process (checked against the scheduler config's betas), the prediction type (the scheduler config's),
prompts and prompt indices are diffusers_sd's. The VAE decodes latents / scaling_factor; with params.dtype float16
it runs in float32 when its config sets force_upcast, as StableDiffusionXLPipeline upcasts it (SDXL's VAE overflows
in half precision).

A condition is a dict, the UNet's inputs as StableDiffusionXLPipeline.encode_prompt and __call__ build them
(clip_skip None): `encoder_hidden_states`, both encoders' penultimate hidden states side by side on the width;
`text_embeds`, text_encoder_2's pooled projection; `time_ids`, the size conditioning (original size, crop top-left
(0, 0), target size), both sizes the latent size times the VAE's scale factor (the pipeline's default height and
width). The null condition of classifier-free guidance is the pipeline's without a negative prompt: zeros for both
embeddings when model_index.json sets force_zeros_for_empty_prompt (SDXL base does; the pipeline's default is
true), else the empty caption encoded; its time ids are the condition's.

    params: {dtype: float32 | float16 | bfloat16, network_batch: rows per UNet call (16, or auto), decode_batch:
             latents per VAE decode (8), cache_dir, allow_pickle: see harness.models.checkpoint, compile: as
             diffusers_sd, unet_weights: {source: a hub id or a local folder, file: a weights file in it}, the
             UNet's weights in place of unet/'s, on unet/config.json (DMD2 publishes UNet-only weights for SDXL
             base: {source: tianweiy/DMD2, file: dmd2_sdxl_4step_unet_fp16.safetensors}; its 1-step UNet is a
             pickle, dmd2_sdxl_1step_unet_fp16.bin, so allow_pickle: true)}
"""

from __future__ import annotations

import torch

from harness.errors import ConfigError
from harness.models.base import condition_length, condition_rows
from harness.models.checkpoint import check_weights_file, load_module, load_tokenizer, locate_weights_file
from harness.models.compiled import load_network
from harness.models.diffusers_sd import StableDiffusion, check_text_pipeline, vae_decode
from harness.models.diffusers_unet import _check_process, _dtype, _prediction

ADAPTER = "diffusers_sdxl"
PIPELINES = {"StableDiffusionXLPipeline"}
ENCODERS = ("text_encoder", "text_encoder_2")
PARTS = {"unet": {"UNet2DConditionModel"}, "vae": {"AutoencoderKL"}, "text_encoder": {"CLIPTextModel"},
         "text_encoder_2": {"CLIPTextModelWithProjection"}}
TOKENIZERS = ("tokenizer", "tokenizer_2")
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
TIME_IDS = 6  # original (height, width), crop top-left (y, x), target (height, width)


def pipeline_files(unet_weights: bool) -> list[str]:
    """The files the adapter reads of the pipeline folder (the `hf download` line): not unet/'s weights when
    params.unet_weights replaces them."""
    return (["model_index.json", "scheduler/*", *(f"{folder}/*" for folder in TOKENIZERS)]
            + [f"{part}/{name}" for part in PARTS for name in ("config.json", WEIGHTS[part])
               if not (unet_weights and part == "unet" and name == WEIGHTS[part])])


class StableDiffusionXL(StableDiffusion):
    @classmethod
    def check_spec(cls, spec: dict) -> None:
        _setup(spec)

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "StableDiffusionXL":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        params = spec.get("params", {})
        checkpoint, process, prediction, prompts, force_zeros, weights = _setup(spec)
        dtype = _dtype(params.get("dtype", "float32"))
        unet, network = load_network(checkpoint, "unet", UNet2DConditionModel, dtype, device, params, weights=weights)
        upcast = dtype == torch.float16 and checkpoint.config("vae").get("force_upcast", True)
        vae = load_module(checkpoint, "vae", AutoencoderKL, torch.float32 if upcast else dtype).to(device)
        encoders = [load_module(checkpoint, part, encoder, dtype).to(device)
                    for part, encoder in zip(ENCODERS, (CLIPTextModel, CLIPTextModelWithProjection))]
        tokenizers = [load_tokenizer(checkpoint, folder, CLIPTokenizer) for folder in TOKENIZERS]
        denoiser = cls.latent_text_denoiser(params, device, checkpoint, unet, network, "unet_call", prediction,
                                            process, prompts, dtype)
        denoiser.vae, denoiser.text_encoders, denoiser.tokenizers = vae, encoders, tokenizers
        height, width = denoiser.info.data_shape[1:]
        scale = 2 ** (len(vae.config.block_out_channels) - 1)  # the pipeline's vae_scale_factor
        pixels = (height * scale, width * scale)
        denoiser.time_ids = torch.tensor([[*pixels, 0, 0, *pixels]], dtype=dtype, device=device)
        denoiser.force_zeros = force_zeros
        return denoiser

    @torch.inference_mode()
    def unet_call(self, x_t, t, cond=None):
        """The UNet's prediction; no condition is the unconditional model (the pipeline's null condition)."""
        cond = self.null_condition(x_t) if cond is None else cond
        return self.network(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]},
                            return_dict=False)[0]

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The UNet's text inputs for `captions`, as StableDiffusionXLPipeline.encode_prompt (clip_skip None)."""
        states = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self.info.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # the penultimate layer
        return {"encoder_hidden_states": torch.cat(states, dim=-1).to(self.info.dtype),
                "text_embeds": out[0].to(self.info.dtype),  # text_encoder_2's projected pooled embedding
                "time_ids": self.time_ids.repeat(len(captions), 1)}

    def null_condition(self, cond):
        if self._null is None:
            null = self.encode([""])
            if self.force_zeros:  # the pipeline's negative embeddings when it is given no negative prompt
                null = {**null, "encoder_hidden_states": torch.zeros_like(null["encoder_hidden_states"]),
                        "text_embeds": torch.zeros_like(null["text_embeds"])}
            self._null = null
        return condition_rows(self._null, [0] * condition_length(cond))

    def decode(self, z0):
        return vae_decode(self.vae, z0, self.decode_batch, self.vae.dtype)


def _setup(spec: dict):
    """(checkpoint, process, prediction, prompts, force_zeros, unet weights file or None) from the config files,
    the prompt file and a safetensors header alone."""
    params = spec.get("params", {})
    replaced = params.get("unet_weights") is not None
    parts = {part: classes for part, classes in PARTS.items() if not (replaced and part == "unet")}
    checkpoint, process, scheduler_config, prompts = check_text_pipeline(spec, ADAPTER, PIPELINES, parts, TOKENIZERS,
                                                                          pipeline_files(replaced))
    source = checkpoint.source
    _check_process(source, process, scheduler_config)
    prediction = _prediction(source, scheduler_config, params.get("prediction"))
    force_zeros = checkpoint.pipeline.get("force_zeros_for_empty_prompt", True)
    if not isinstance(force_zeros, bool):
        raise ConfigError(f"{ADAPTER}: {source}/model_index.json: force_zeros_for_empty_prompt is true or false, not "
                          f"{force_zeros!r}")
    if checkpoint.config("vae").get("latents_mean") is not None:
        raise ConfigError(f"{ADAPTER}: {source}/vae/config.json sets latents_mean/latents_std (a Playground-style "
                          f"latent normalisation); this adapter decodes latents / scaling_factor only")
    _check_widths(checkpoint, checkpoint.check_class("unet", PARTS["unet"]))
    weights = None
    if replaced:
        from diffusers import UNet2DConditionModel

        weights = locate_weights_file(params["unet_weights"], ADAPTER, "unet_weights", params)
        check_weights_file(checkpoint, "unet", UNet2DConditionModel, weights)
    return checkpoint, process, prediction, prompts, force_zeros, weights


def _check_widths(checkpoint, unet: dict) -> None:
    """The UNet takes SDXL's added conditions at the widths the encoders and tokenizers give (a mismatch would fail
    inside its first call)."""
    from transformers import CLIPTextConfig  # its defaults fill what a saved config.json leaves out

    where = f"{ADAPTER}: {checkpoint.source}"
    if unet.get("addition_embed_type") != "text_time":
        raise ConfigError(f"{where}/unet/config.json has addition_embed_type {unet.get('addition_embed_type')!r}, not "
                          f"'text_time' (SDXL's pooled text embedding and size conditioning)")
    clip = [CLIPTextConfig.from_pretrained(str(checkpoint.folder(part))) for part in ENCODERS]
    width = sum(c.hidden_size for c in clip)
    time_width = unet.get("addition_time_embed_dim")
    added = TIME_IDS * time_width + clip[1].projection_dim if isinstance(time_width, int) else None
    if width != unet.get("cross_attention_dim") or added != unet.get("projection_class_embeddings_input_dim"):
        raise ConfigError(f"{where}'s text encoders do not fit its UNet: hidden widths {width} for cross_attention_dim "
                          f"{unet.get('cross_attention_dim')}, {TIME_IDS} time ids x addition_time_embed_dim "
                          f"{time_width} + text_encoder_2's projection_dim {clip[1].projection_dim} for "
                          f"projection_class_embeddings_input_dim {unet.get('projection_class_embeddings_input_dim')}")
    lengths = [checkpoint.config(folder, "tokenizer_config.json").get("model_max_length") for folder in TOKENIZERS]
    if lengths[0] != lengths[1]:  # the two encoders' hidden states are joined token by token
        raise ConfigError(f"{where}: tokenizer/ and tokenizer_2/ pad to {lengths[0]} and {lengths[1]} tokens; SDXL's "
                          f"encoders need the same length")
