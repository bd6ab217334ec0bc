"""The diffusers_audioldm adapter (text-to-audio latent diffusion) on a tiny random AudioLDM folder.

A seeded UNet2DConditionModel (CLAP embedding as a simple_projection class embedding), AutoencoderKL over one-channel
mel spectrograms, ClapTextModelWithProjection with a byte-level Roberta tokenizer built here, and a SpeechT5HifiGan
vocoder go through AudioLDMPipeline.save_pretrained into a temp folder; the adapter loads it as a models.yaml entry.
A guided dpmpp_2m cell through run_cell (kept noise, the pipeline's own timesteps as an explicit schedule) is
cross-checked in float32 against AudioLDMPipeline with DPMSolverMultistepScheduler from that noise with the same
prompts: the final latents and the vocoder's waveforms. The same cell checks the NFE audit under guidance, that
clap_score and the report read its samples as audio at the vocoder's rate, and planning's refusals.
"""

from __future__ import annotations

import json
import shutil
import wave

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    AudioLDMPipeline,
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from test_clip_clap import tiny_roberta_tokenizer, write_tiny_clap_files  # noqa: E402
from test_diffusers_sd import scheduler_overrides  # noqa: E402
from transformers import (  # noqa: E402
    ClapTextConfig,
    ClapTextModelWithProjection,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

from harness.cells import run_cell  # noqa: E402
from harness.config import load_methods, load_models, validate  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.evaluate import evaluate_cell  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402
from harness.report.thumbnails import write_thumbnails  # noqa: E402
from harness.metrics.text_alignment import prompt_indices  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:__array__ implementation:DeprecationWarning")

# AudioLDM's scheduler (diffusers' conversion script: DDIM, scaled_linear from 0.0015 to 0.0195)
BETAS = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
PROCESS = {"kind": "vp_discrete", **BETAS}
PROMPTS = ["a dog barks twice", "rain on a tin roof", "a violin"]
# the captions stepbench gives a seed-0 cell's samples 0, 1, 2 (they depend on (seed, i)): the pipeline gets them too
SEED0_PROMPTS = [PROMPTS[k] for k in prompt_indices(0, range(len(PROMPTS)), len(PROMPTS))]
RATE = 16000  # the vocoder's sampling_rate
HOP = 16  # waveform samples per mel frame (upsample_rates 4 x 4)
SCALE, STEPS = 2.5, 6  # AudioLDMPipeline's default guidance scale
SECONDS = 0.025  # 25 frames, rounded up to 26 (a multiple of the VAE's factor 2) and the waveform cut to 400
RTOL = 1e-4


def save_tiny_audioldm(folder):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(8, 16),
                                class_embed_type="simple_projection", projection_class_embeddings_input_dim=16,
                                class_embeddings_concat=True, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    (folder / "tokenizer-src").mkdir(parents=True)
    # the tokenizer pads captions to 12; the pipeline pads its negative prompt to the embedding width, 16
    tokenizer = tiny_roberta_tokenizer(folder / "tokenizer-src", model_max_length=12)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=24, pad_token_id=1, bos_token_id=0, eos_token_id=2, projection_dim=16))
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=RATE, upsample_initial_channel=16, upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3], [1, 3]],
        normalize_before=False, initializer_range=0.2))  # audible: the default 0.01 gives ~1e-6
    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                     vocoder=vocoder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory):
    return save_tiny_audioldm(tmp_path_factory.mktemp("tiny-audioldm"))


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clap")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        write_tiny_clap_files(folder)  # an untrained CLAP at 8 kHz: the metric resamples the 16 kHz audio
    return folder


def spec(source, **extra):
    entry = {"adapter": "diffusers_audioldm", "source": str(source), "process": PROCESS, "prompts": PROMPTS,
             "sample_rate": RATE, "metrics": ["clap_score"], **extra}
    validate({"tiny-audioldm": entry}, "models", "models.yaml")  # the entry is one models.yaml would hold
    return entry


def pipeline(folder):
    pipe = AudioLDMPipeline.from_pretrained(folder)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                             **scheduler_overrides(DPMSolverMultistepScheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def guided_cell(audio_folder, clap_folder, tmp_path_factory):
    """A guided dpmpp_2m cell on the pipeline's timesteps with its noise kept, and the pipeline from that noise:
    (entry, cell folder, cell.json, samples.npz arrays, the pipeline's final latents, the pipeline's waveforms)."""
    pipe = pipeline(audio_folder)
    pipe.scheduler.set_timesteps(STEPS)
    method = {"family": "solver", "solver": "dpmpp_2m",
              "schedule": {"kind": "explicit", "timesteps": [int(t) for t in pipe.scheduler.timesteps]}}
    entry = spec(audio_folder, params={"audio_length_s": SECONDS}, clap={"model": str(clap_folder)})
    out = tmp_path_factory.mktemp("cell")
    cell = run_cell("tiny-audioldm", entry, "dpmpp_2m_pipeline_steps", method, STEPS, out, num_samples=3,
                    batch_size=3, keep_noise=True, guidance=SCALE)
    with np.load(out / "samples.npz") as saved:
        arrays = {name: saved[name] for name in saved.files}
    final = {}
    with torch.inference_mode():
        waves = pipe(SEED0_PROMPTS, audio_length_in_s=SECONDS, num_inference_steps=STEPS, guidance_scale=SCALE,
                     latents=torch.from_numpy(arrays["noise"]), output_type="np", callback_steps=1,
                     callback=lambda step, t, latents: final.update(latents=latents.clone())).audios
    return entry, out, cell, arrays, final["latents"].numpy(), waves


def relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_loads_as_a_latent_audio_text_model(audio_folder, tmp_path):
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"tiny-audioldm": spec(audio_folder)}))
    entry = load_models(tmp_path / "models.yaml")["tiny-audioldm"]
    check_model(entry)
    denoiser = load_denoiser(entry)
    info = denoiser.info
    # the UNet's sample_size, 16 latent frames of 8 / 2 mel bins: 32 mel frames, 512 waveform samples
    assert info.latent and info.data_shape == (4, 16, 4) and info.prediction == "eps"
    assert info.extra["audio"] and info.extra["sample_rate"] == RATE and info.extra["text"]
    cond = denoiser.conditions(0, range(5))
    assert cond.shape == (5, 16)
    torch.testing.assert_close(cond.norm(dim=-1), torch.ones(5))  # normalised as the pipeline's _encode_prompt
    which = prompt_indices(0, range(5), 3)  # sample i's caption depends on (seed, i) alone
    assert sorted(which[:3]) == [0, 1, 2]
    torch.testing.assert_close(cond[3], cond[list(which[:3]).index(which[3])])  # the same caption, encoded once
    np.testing.assert_array_equal(denoiser.condition_record(0, 5)["prompt_index"], which)
    assert denoiser.decode(torch.zeros(3, 4, 16, 4)).shape == (3, 32 * HOP)
    assert load_denoiser(spec(audio_folder, params={"audio_length_s": 0.02})).info.data_shape == (4, 10, 4)


def test_a_guided_cell_matches_the_pipeline_latents_and_waveforms(guided_cell):
    _, _, cell, saved, latents, waves = guided_cell
    assert cell["status"] == "ok"
    assert saved["latents"].shape == latents.shape == (3, 4, 13, 4)
    assert saved["samples"].shape == waves.shape == (3, int(SECONDS * RATE))  # the pipeline's cut of 416 to 400
    np.testing.assert_array_equal(saved["prompt_index"], prompt_indices(0, range(3), 3))
    assert relative(saved["latents"], latents) <= RTOL
    assert relative(saved["samples"], waves) <= RTOL


def test_nfe_and_network_passes_under_guidance(guided_cell, audio_folder, tmp_path):
    entry, _, cell, _, _, _ = guided_cell
    assert cell["nfe_measured"] == STEPS and cell["network_evals"] == 2 * STEPS  # each guided call: two passes
    methods = load_methods("methods.yaml")
    unguided = run_cell("tiny-audioldm", entry, "dpmpp_2m", methods["dpmpp_2m"], 4, tmp_path, num_samples=2,
                        batch_size=2)
    assert unguided["nfe_measured"] == 4 and unguided["network_evals"] == 4


def test_clap_score_and_the_report_read_the_cell_as_audio(guided_cell, clap_folder, tmp_path):
    """clap_score on the cell is CLAP of the pipeline's own waveforms against their prompts, at the vocoder's rate."""
    from harness.metrics.clap_score import clap_scores, load_clap

    entry, out, _, _, _, waves = guided_cell
    metrics = evaluate_cell(out, entry, {}, ["clap_score"], tmp_path / "cache")
    expected = clap_scores(load_clap(str(clap_folder)), waves, RATE, SEED0_PROMPTS)
    assert abs(metrics["clap_score"] - float(expected.mean())) <= 1e-4
    provenance = metrics["provenance"]["clap_score"]
    assert provenance["sample_rate"] == RATE and provenance["resampled"] and provenance["num_samples"] == 3
    thumbs = write_thumbnails(out / "samples.npz", tmp_path / "thumbs", "cell", entry)
    assert thumbs.kind == "audio" and len(thumbs.audio) == 3
    with wave.open(str(tmp_path / thumbs.audio[0]), "rb") as player:
        assert player.getframerate() == RATE and player.getnframes() == int(SECONDS * RATE)


def test_refusals_at_planning(audio_folder, tmp_path):
    without_rate = {k: v for k, v in spec(audio_folder).items() if k != "sample_rate"}
    with pytest.raises(ConfigError, match=r"makes audio at 16000 Hz .*needs sample_rate: 16000 .* but has none$"):
        check_model(without_rate)
    with pytest.raises(ConfigError, match=r"needs sample_rate: 16000 .* but says 22050$"):
        check_model(spec(audio_folder, sample_rate=22050))
    for bad in (0.001, "10s"):
        with pytest.raises(ConfigError, match=r"params.audio_length_s is a number of seconds of at least 0.002"):
            check_model(spec(audio_folder, params={"audio_length_s": bad}))
    with pytest.raises(ConfigError, match="disagrees with the checkpoint's scheduler config"):
        check_model(spec(audio_folder, process={**PROCESS, "beta_end": 0.012}))
    with pytest.raises(ConfigError, match=r"is a AudioLDMPipeline folder, not one of StableDiffusionPipeline; "
                                          r"adapter diffusers_audioldm takes it$"):
        check_model({**spec(audio_folder), "adapter": "diffusers_sd"})
    copy = shutil.copytree(audio_folder, tmp_path / "no-projection")
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": None}))
    with pytest.raises(ConfigError, match=r"class_embed_type None, not 'simple_projection'"):
        check_model(spec(copy))
