"""Stable Diffusion 3 (Esser et al. 2024, rectified flow with an MMDiT): models.yaml `adapter: diffusers_sd3`.

A StableDiffusion3Pipeline folder (stabilityai/stable-diffusion-3-medium-diffusers in the Hugging Face cache, or a
local save_pretrained folder): transformer/ (SD3Transformer2DModel), vae/ (AutoencoderKL, 16 latent channels),
text_encoder/ and text_encoder_2/ (CLIPTextModelWithProjection, CLIP ViT-L and OpenCLIP bigG), text_encoder_3/
(T5EncoderModel, T5-XXL), tokenizer/, tokenizer_2/ (CLIPTokenizer), tokenizer_3/ (T5TokenizerFast), scheduler/
(FlowMatchEulerDiscreteScheduler). Each network is loaded under harness.models.checkpoint's rules (class, every
weight, safetensors).

The process is a rectified flow, x_t = (1 - t) x0 + t eps, and the transformer predicts the velocity eps - x0 at
timestep 1000 t (the scheduler's num_train_timesteps t, as StableDiffusion3Pipeline hands it the scheduler's
timesteps); models.yaml's `process` must be rectified_flow with the scheduler config's `shift` (SD3: 3.0), checked
while the grid is planned as the betas of a DDPM model are. The time steps themselves are a method's
(`euler_flow_shift3` and `heun_flow_shift3` are FlowMatchEuler's and FlowMatchHeun's on SD3's shifted grid).

Prompts, prompt indices, the null condition (the empty caption, the pipeline's default negative prompt) and the
VAE decoder (latents / scaling_factor + shift_factor) are diffusers_sd's. A condition is a dict, as
StableDiffusion3Pipeline.encode_prompt builds it: `encoder_hidden_states`, both CLIP encoders' penultimate hidden
states (clip_skip None) side by side, zero-padded to T5's width, then T5's last hidden state after them along the
tokens; `pooled_projections`, both CLIP encoders' pooled projections side by side.

    params: {dtype: float32 | float16 | bfloat16, network_batch: rows per transformer call (16), decode_batch:
             latents per VAE decode (8), max_sequence_length: T5 tokens (256, the pipeline's default; at most 512),
             cache_dir, allow_pickle: see harness.models.checkpoint}
"""

from __future__ import annotations

import torch

from harness.errors import ConfigError
from harness.models.checkpoint import load_module, load_tokenizer
from harness.models.compiled import load_network
from harness.models.diffusers_sd import StableDiffusion, check_text_pipeline
from harness.models.diffusers_unet import _dtype
from harness.schedules import RectifiedFlow

PIPELINES = {"StableDiffusion3Pipeline"}
CLIP = ("text_encoder", "text_encoder_2")
PARTS = {"transformer": {"SD3Transformer2DModel"}, "vae": {"AutoencoderKL"},
         **{part: {"CLIPTextModelWithProjection"} for part in CLIP}, "text_encoder_3": {"T5EncoderModel"}}
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
WEIGHTS = {"transformer": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors",
           "text_encoder_3": "model*.safetensors"}  # T5-XXL is sharded (model-0000k-of-0000n + its index)
FILES = (["model_index.json", "scheduler/*", *(f"{folder}/*" for folder in TOKENIZERS),
          "text_encoder_3/model.safetensors.index.json"]
         + [f"{part}/{name}" for part in PARTS for name in ("config.json", WEIGHTS[part])])
SCHEDULERS = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}


class StableDiffusion3(StableDiffusion):
    @classmethod
    def check_spec(cls, spec: dict) -> None:
        _setup(spec)

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "StableDiffusion3":
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        params = spec.get("params", {})
        checkpoint, process, prompts, timestep_scale, max_sequence_length = _setup(spec)
        dtype = _dtype(params.get("dtype", "float32"))
        transformer, network = load_network(checkpoint, "transformer", SD3Transformer2DModel, dtype, device, params)
        vae = load_module(checkpoint, "vae", AutoencoderKL, dtype).to(device)
        encoders = [load_module(checkpoint, part, CLIPTextModelWithProjection, dtype).to(device) for part in CLIP]
        encoders.append(load_module(checkpoint, "text_encoder_3", T5EncoderModel, dtype).to(device))
        tokenizers = [load_tokenizer(checkpoint, folder, cls_) for folder, cls_ in
                      zip(TOKENIZERS, (CLIPTokenizer, CLIPTokenizer, T5TokenizerFast))]
        denoiser = cls.latent_text_denoiser(params, device, checkpoint, transformer, network, "transformer_call",
                                            "flow", process, prompts, dtype)
        denoiser.vae, denoiser.text_encoders, denoiser.tokenizers = vae, encoders, tokenizers
        denoiser.timestep_scale, denoiser.max_sequence_length = timestep_scale, max_sequence_length
        return denoiser

    @torch.inference_mode()
    def transformer_call(self, x_t, t, cond=None):
        """The velocity eps - x0 at flow time t; no condition is the unconditional model (the empty caption)."""
        cond = self.null_condition(x_t) if cond is None else cond
        return self.network(x_t, encoder_hidden_states=cond["encoder_hidden_states"],
                           pooled_projections=cond["pooled_projections"], timestep=t * self.timestep_scale,
                           return_dict=False)[0]

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The transformer's text inputs for `captions`, as StableDiffusion3Pipeline.encode_prompt (clip_skip None)."""
        device = self.info.device
        clip_length = self.tokenizers[0].model_max_length  # the pipeline pads both CLIP prompts to the first's
        states, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = tokenizer(captions, padding="max_length", max_length=clip_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # the penultimate layer
            pooled.append(out[0])  # the projected pooled embedding
        ids = self.tokenizers[2](captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                 add_special_tokens=True, return_tensors="pt").input_ids
        t5 = self.text_encoders[2](ids.to(device))[0]
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2).to(self.info.dtype),
                "pooled_projections": torch.cat(pooled, dim=-1).to(self.info.dtype)}


def _setup(spec: dict):
    """(checkpoint, process, prompts, timestep scale, T5 tokens) from the config files and the prompt file alone."""
    checkpoint, process, scheduler_config, prompts = check_text_pipeline(spec, "diffusers_sd3", PIPELINES, PARTS,
                                                                          TOKENIZERS, FILES)
    source, params = checkpoint.source, spec.get("params", {})
    _check_flow_process(source, process, scheduler_config)
    if params.get("prediction", "flow") != "flow":
        raise ConfigError(f"{source}: params.prediction is {params['prediction']!r} but SD3's transformer predicts "
                          f"the flow velocity ('flow')")
    max_sequence_length = params.get("max_sequence_length", 256)
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
            or not 1 <= max_sequence_length <= 512:
        raise ConfigError(f"{source}: params.max_sequence_length is the number of T5 tokens, 1 to 512 (as "
                          f"StableDiffusion3Pipeline), not {max_sequence_length!r}")
    _check_widths(checkpoint)
    return checkpoint, process, prompts, float(scheduler_config.get("num_train_timesteps", 1000)), max_sequence_length


def _check_flow_process(source: str, process, config: dict) -> None:
    """models.yaml's process is the scheduler config's: a rectified flow with its shift."""
    found = config.get("_class_name")
    if found not in SCHEDULERS:
        raise ConfigError(f"{source}: scheduler/scheduler_config.json names {found}, not a flow-matching scheduler "
                          f"({', '.join(sorted(SCHEDULERS))})")
    if not isinstance(process, RectifiedFlow):
        raise ConfigError(f"{source}: SD3 is a flow-matching model; its process kind is rectified_flow, not "
                          f"{process.kind}")
    if config.get("use_dynamic_shifting"):
        raise ConfigError(f"{source}: the scheduler shifts its time steps by resolution (use_dynamic_shifting); "
                          f"stepbench's rectified_flow states one shift")
    theirs = float(config.get("shift", 1.0))
    if abs(process.shift - theirs) > 1e-9 * theirs:
        raise ConfigError(f"{source}: models.yaml's process (rectified_flow, shift {process.shift:g}) disagrees with "
                          f"the checkpoint's scheduler config (shift {theirs:g})")


def _check_widths(checkpoint) -> None:
    """The text encoders' widths are those the transformer takes (a mismatch would fail inside its first call)."""
    from transformers import CLIPTextConfig, T5Config  # their defaults fill what a saved config.json leaves out

    transformer = checkpoint.config("transformer")
    clip = [CLIPTextConfig.from_pretrained(str(checkpoint.folder(part))) for part in CLIP]
    t5_width = T5Config.from_pretrained(str(checkpoint.folder("text_encoder_3"))).d_model
    clip_width = sum(c.hidden_size for c in clip)
    pooled = sum(c.projection_dim for c in clip)
    if t5_width != transformer.get("joint_attention_dim") or clip_width > t5_width \
            or pooled != transformer.get("pooled_projection_dim"):
        raise ConfigError(f"diffusers_sd3: {checkpoint.source}'s text encoders do not fit its transformer: T5 width "
                          f"{t5_width} and CLIP widths {clip_width} (at most T5's) for joint_attention_dim "
                          f"{transformer.get('joint_attention_dim')}, pooled projections {pooled} for "
                          f"pooled_projection_dim {transformer.get('pooled_projection_dim')}")
