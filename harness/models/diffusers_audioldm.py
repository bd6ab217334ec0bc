"""Text-to-audio latent diffusion (AudioLDM, Liu et al. 2023): models.yaml `adapter: diffusers_audioldm`.

An AudioLDMPipeline folder (cvssp/audioldm-s-full-v2 in the Hugging Face cache, or a local save_pretrained folder):
unet/ (UNet2DConditionModel), vae/ (AutoencoderKL over mel spectrograms), vocoder/ (SpeechT5HifiGan),
text_encoder/ (ClapTextModelWithProjection), tokenizer/ (Roberta), scheduler/, each loaded under
harness.models.checkpoint's rules. What is shared with Stable Diffusion's layout is diffusers_sd's: the planning
checks (check_text_pipeline), the prompts (sample i has prompts[i mod N], samples.npz records the index), each
batch's distinct captions encoded once, the empty caption as the null condition of guidance, the VAE decode.

Where AudioLDM differs, this follows AudioLDMPipeline (diffusers 0.42, pipelines/deprecated/audioldm):
- the condition is CLAP's projected text embedding [D], L2-normalised over its last dimension (_encode_prompt),
  and it enters the UNet as `class_labels` (class_embed_type "simple_projection") with no encoder_hidden_states;
  the null condition is the empty prompt's embedding, the pipeline's default negative prompt;
- the latent is [C, frames / f, mel bins / f] (f = the VAE's downsampling), frames from the audio length (by
  default the length the UNet's sample_size gives, as the pipeline's default, or `params.audio_length_s`), rounded
  up to a multiple of f as the pipeline rounds it, and the waveform cut back to the length asked for;
- `decode` is the VAE on latents / scaling_factor (a mel spectrogram), then the HiFi-GAN vocoder: waveforms [S, T]
  at the vocoder's sampling_rate, `params.decode_batch` latents per call, apart from the network's batch.
The samples are audio: DenoiserInfo.extra says so (audio, sample_rate), and the entry's `sample_rate`, which
clap_score and the report's audio players read, must be the vocoder's (checked at planning). samples.npz keeps
the latents too (mse_ref is measured there, as for Stable Diffusion).

    params: {dtype: float32 | float16 | bfloat16, network_batch: rows per UNet call (16), decode_batch: latents
             per VAE + vocoder call (8), audio_length_s: seconds of audio (default: the UNet's sample_size),
             cache_dir, allow_pickle: see harness.models.checkpoint}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.errors import ConfigError
from harness.models.checkpoint import load_module
from harness.models.compiled import load_network
from harness.models.diffusers_sd import StableDiffusion, check_text_pipeline, pipeline_files, vae_decode
from harness.models.diffusers_unet import _check_process, _dtype, _prediction

ADAPTER = "diffusers_audioldm"
PIPELINES = {"AudioLDMPipeline"}
PARTS = {"unet": {"UNet2DConditionModel"}, "vae": {"AutoencoderKL"}, "text_encoder": {"ClapTextModelWithProjection"},
         "vocoder": {"SpeechT5HifiGan"}}
FILES = pipeline_files({"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                        "text_encoder": "model.safetensors", "vocoder": "model.safetensors"})


@dataclass(frozen=True)
class AudioLayout:
    """The latent and waveform sizes of a checkpoint at one audio length, read from its configs."""

    sample_rate: int  # the vocoder's, samples per second
    latent_shape: tuple[int, int, int]  # [channels, frames / f, mel bins / f]
    num_audio_samples: int  # waveform samples per clip, after the pipeline's cut


class AudioLDM(StableDiffusion):
    """Stable Diffusion's prompt handling (conditions, condition_record, null_condition) on AudioLDM's networks."""

    @classmethod
    def check_spec(cls, spec: dict) -> None:
        _setup(spec)

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "AudioLDM":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import ClapTextModelWithProjection, RobertaTokenizer, SpeechT5HifiGan

        params = spec.get("params", {})
        checkpoint, process, prediction, prompts, layout = _setup(spec)
        dtype = _dtype(params.get("dtype", "float32"))
        unet, network = load_network(checkpoint, "unet", UNet2DConditionModel, dtype, device, params)
        vae = load_module(checkpoint, "vae", AutoencoderKL, dtype).to(device)
        text_encoder = load_module(checkpoint, "text_encoder", ClapTextModelWithProjection, dtype).to(device)
        vocoder = load_module(checkpoint, "vocoder", SpeechT5HifiGan, dtype).to(device)
        tokenizer = RobertaTokenizer.from_pretrained(str(checkpoint.root), subfolder="tokenizer", local_files_only=True)
        # data_range (-1, 1): the vocoder ends in tanh
        denoiser = cls.latent_text_denoiser(params, device, checkpoint, unet, network, "unet_call", prediction,
                                            process, prompts, dtype, data_shape=layout.latent_shape, audio=True,
                                            sample_rate=layout.sample_rate)
        denoiser.vae, denoiser.vocoder = vae, vocoder
        denoiser.text_encoder, denoiser.tokenizer = text_encoder, tokenizer
        denoiser.num_audio_samples = layout.num_audio_samples
        return denoiser

    @torch.inference_mode()
    def unet_call(self, x_t, t, cond=None):
        """The UNet's prediction; the text embedding is its class embedding, nothing is cross-attended."""
        cond = self.null_condition(x_t) if cond is None else cond
        return self.network(x_t, t, encoder_hidden_states=None, class_labels=cond, return_dict=False)[0]

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """Unit-norm CLAP text embeddings [len(captions), D], as AudioLDMPipeline._encode_prompt. (The pipeline pads
        its negative prompt to the embedding width rather than the tokenizer's length; under the attention mask the
        padding does not change the embedding, so the empty caption is encoded here as every other caption is.)"""
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        out = self.text_encoder(tokens.input_ids.to(self.info.device),
                                attention_mask=tokens.attention_mask.to(self.info.device))
        return torch.nn.functional.normalize(out.text_embeds, dim=-1).to(self.info.dtype)

    @torch.inference_mode()
    def decode(self, z0):
        """Waveforms [S, T]: each batch of latents through the VAE to mel spectrograms [B, 1, frames, mels], then the
        vocoder (AudioLDMPipeline.decode_latents + mel_spectrogram_to_waveform), cut to the audio length."""
        waves = []
        for start in range(0, len(z0), self.decode_batch):
            mel = vae_decode(self.vae, z0[start:start + self.decode_batch], self.decode_batch, self.info.dtype)
            waves.append(self.vocoder(mel.squeeze(1)))
        return torch.cat(waves)[:, :self.num_audio_samples]


def _setup(spec: dict):
    """(checkpoint, process, prediction, prompts, layout) from the config files and the prompt file alone."""
    checkpoint, process, scheduler_config, prompts = check_text_pipeline(spec, ADAPTER, PIPELINES, PARTS,
                                                                          ("tokenizer",), FILES)
    _check_process(checkpoint.source, process, scheduler_config)
    prediction = _prediction(checkpoint.source, scheduler_config, spec.get("params", {}).get("prediction"))
    source = checkpoint.source
    unet, vae = checkpoint.config("unet"), checkpoint.config("vae")
    text, vocoder = checkpoint.config("text_encoder"), checkpoint.config("vocoder")
    if unet.get("class_embed_type") != "simple_projection":
        raise ConfigError(f"{ADAPTER}: {source}/unet/config.json has class_embed_type "
                          f"{unet.get('class_embed_type')!r}, not 'simple_projection': AudioLDM's UNet takes the CLAP "
                          f"text embedding as its class embedding")
    width = text.get("projection_dim", 512)  # ClapTextConfig's default
    takes = unet.get("projection_class_embeddings_input_dim")
    if takes != width:
        raise ConfigError(f"{ADAPTER}: {source}/unet/config.json takes class embeddings of width "
                          f"{takes}, but the text encoder projects to {width}")
    if vae.get("out_channels", 3) != 1:
        raise ConfigError(f"{ADAPTER}: {source}/vae/config.json decodes {vae.get('out_channels', 3)} channels; "
                          f"AudioLDM's VAE decodes one mel spectrogram")
    layout = audio_layout(source, spec.get("params", {}).get("audio_length_s"), unet, vae, vocoder)
    stated = spec.get("sample_rate")
    if stated != layout.sample_rate:
        said = "has none" if stated is None else f"says {stated}"
        raise ConfigError(f"{ADAPTER}: {source} makes audio at {layout.sample_rate} Hz (vocoder/config.json "
                          f"sampling_rate); the entry needs sample_rate: {layout.sample_rate} (clap_score and the "
                          f"report's players read it) but {said}")
    return checkpoint, process, prediction, prompts, layout


def audio_layout(source: str, seconds, unet: dict, vae: dict, vocoder: dict) -> AudioLayout:
    """The latent shape and waveform length of `seconds` of audio (None: the UNet's sample_size), computed as
    AudioLDMPipeline.__call__ computes them (the same float operations, so the same frame count)."""
    scale = 2 ** (len(vae["block_out_channels"]) - 1)  # the VAE's downsampling, the pipeline's vae_scale_factor
    mels, rate = int(vocoder.get("model_in_dim", 80)), int(vocoder.get("sampling_rate", 16000))
    hop = np.prod(vocoder.get("upsample_rates", [4, 4, 4, 4])) / rate  # seconds per spectrogram frame
    if mels % scale:
        raise ConfigError(f"{ADAPTER}: {source}: the vocoder's {mels} mel bins are not divisible by the VAE's "
                          f"downsampling factor {scale}")
    if seconds is None:
        size = unet.get("sample_size")
        if not isinstance(size, int):
            raise ConfigError(f"{ADAPTER}: {source}/unet/config.json sample_size {size!r} is not one number of "
                              f"frames; set params.audio_length_s")
        seconds = size * scale * hop
    elif isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < hop * scale:
        raise ConfigError(f"{ADAPTER}: {source}: params.audio_length_s is a number of seconds of at least "
                          f"{hop * scale:g} (one latent frame), not {seconds!r}")
    frames = int(seconds / hop)
    if frames % scale:
        frames = int(np.ceil(frames / scale)) * scale
    return AudioLayout(rate, (int(unet["in_channels"]), frames // scale, mels // scale), int(seconds * rate))
