"""The diffusers_sd3 adapter (Stable Diffusion 3, rectified flow) on a tiny random StableDiffusion3Pipeline folder.

A seeded SD3Transformer2DModel, an AutoencoderKL with 16 latent channels and a shift_factor, two
CLIPTextModelWithProjection of different widths (so the padding to T5's width shows), a T5EncoderModel, CLIP
tokenizers over single letters (test_diffusers_sd's) and a T5 Unigram tokenizer built here go through
StableDiffusion3Pipeline.save_pretrained into a temp folder, and the adapter loads it as models.yaml's entry would.

Cross-checks in float32 against StableDiffusion3Pipeline itself, with the same prompts and guidance scale, from
the latents stepbench's cell started from (its kept noise at the process's first level, x_t = t_max eps):
- the conditions are the pipeline's encode_prompt outputs, the null condition its default negative prompt's;
- euler_flow_shift3 (a cell through run_cell, so the NFE audit is checked too) against the pipeline's own
  FlowMatchEulerDiscreteScheduler, given the uniform unshifted times between the process's ends as `sigmas` (the
  scheduler applies its shift 3);
- heun_flow_shift3 against FlowMatchHeunDiscreteScheduler on the same shifted levels (it takes no `sigmas`, so its
  set_timesteps installs them; as in test_flow_matching_vs_diffusers, neither side starts at t = 1);
and the decoded images against the pipeline's VAE decode (latents / scaling_factor + shift_factor).
"""

from __future__ import annotations

import json
import shutil
import string

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from test_diffusers_sd import tiny_tokenizer  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel  # noqa: E402
from transformers import T5TokenizerFast  # noqa: E402

from harness.cells import run_cell  # noqa: E402
from harness.config import load_methods  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.metrics.text_alignment import prompt_indices  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402
from harness.schedules import make_process  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:__array__ implementation:DeprecationWarning")

SHIFT = 3.0
# as models.yaml's sd3-medium: at t_min 1e-4 the float32 Heun runs differ by 4e-4 (the velocity read back from
# x0 = x_t - t v at small t), at its 1/112 by 5e-6
PROCESS = {"kind": "rectified_flow", "t_min": 0.0089285714, "t_max": 0.999, "shift": SHIFT}
PROMPTS = ["a red cat", "two dogs", "a boat at sea"]
# the captions stepbench gives a seed-0 cell's samples 0, 1, 2 (they depend on (seed, i)): the pipeline gets them too
SEED0_PROMPTS = [PROMPTS[k] for k in prompt_indices(0, range(len(PROMPTS)), len(PROMPTS))]
T5_TOKENS = 10
SCALE = 4.0
RTOL = 1e-4


def tiny_t5_tokenizer():
    """A T5 Unigram tokenizer over single letters, with and without the word-start mark, and no sentinels."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{c}", -2.5) for c in string.ascii_lowercase] + [(c, -3.0) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0), len(pieces)


def clip_encoder(hidden):
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=54, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=16, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def save_tiny_sd3(folder):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    t5_tokenizer, t5_vocab = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    clip_tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=vae,
                             text_encoder=clip_encoder(16), tokenizer=clip_tokenizer, text_encoder_2=clip_encoder(12),
                             tokenizer_2=clip_tokenizer, text_encoder_3=t5,
                             tokenizer_3=t5_tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def spec(source, **extra):
    return {"adapter": "diffusers_sd3", "source": str(source), "process": PROCESS, "metrics": [],
            "prompts": PROMPTS, "params": {"max_sequence_length": T5_TOKENS}, **extra}


def pipeline(folder):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def relative(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm())


def test_loads_and_encodes_prompts_as_the_pipeline(sd3_folder):
    check_model(spec(sd3_folder))
    denoiser = load_denoiser(spec(sd3_folder))
    assert denoiser.info.latent and denoiser.info.data_shape == (16, 8, 8) and denoiser.info.prediction == "flow"
    cond = denoiser.conditions(0, range(5))
    assert cond["encoder_hidden_states"].shape == (5, 12 + T5_TOKENS, 32)  # CLIP's 12 tokens, then T5's
    assert cond["pooled_projections"].shape == (5, 32)
    which = list(prompt_indices(0, range(5), 3))  # sample 3's caption is one of samples 0-2's
    torch.testing.assert_close(cond["encoder_hidden_states"][3], cond["encoder_hidden_states"][which.index(which[3])])
    np.testing.assert_array_equal(denoiser.condition_record(0, 5)["prompt_index"], prompt_indices(0, range(5), 3))

    pipe = pipeline(sd3_folder)
    with torch.inference_mode():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            SEED0_PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=T5_TOKENS)
    assert float(embeds[:, :12, 28:].abs().max()) == 0  # CLIP's 16 + 12 widths, zero-padded to T5's 32
    ours = denoiser.conditions(0, range(3))
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds)
    torch.testing.assert_close(ours["pooled_projections"], pooled)
    null = denoiser.null_condition(ours)
    torch.testing.assert_close(null["encoder_hidden_states"], negative)
    torch.testing.assert_close(null["pooled_projections"], negative_pooled)
    # the random network reads its prompt: the conditional and unconditional velocities differ
    x = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    assert relative(denoiser(x, 1.0, ours), denoiser(x, 1.0, null)) > 1e-2
    assert denoiser.decode(torch.zeros(3, 16, 8, 8)).shape == (3, 3, 16, 16)


def unshifted(t):
    """The flow time u whose shift by SHIFT is t (diffusers shifts the `sigmas` it is given)."""
    return t / (SHIFT - (SHIFT - 1) * t)


def shifted(u):
    return SHIFT * u / (1 + (SHIFT - 1) * u)


def install_heun(scheduler, levels):
    """FlowMatchHeun's set_timesteps with these flow times in place of its own grid (it takes no `sigmas`)."""

    def set_timesteps(num_inference_steps=None, device=None):
        sigmas = torch.from_numpy(levels).float()
        timesteps = sigmas * scheduler.config.num_train_timesteps
        scheduler.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        scheduler.sigmas = torch.cat([sigmas[:1], sigmas[1:].repeat_interleave(2), torch.zeros(1)])
        scheduler.prev_derivative = scheduler.dt = scheduler._step_index = scheduler._begin_index = None

    scheduler.set_timesteps = set_timesteps
    return scheduler


@pytest.mark.parametrize("method, steps, nfe", [("euler_flow_shift3", 5, 5), ("heun_flow_shift3", 4, 7)])
def test_guided_cells_match_the_pipeline(sd3_folder, tmp_path, method, steps, nfe):
    entry = spec(sd3_folder)
    cell = run_cell("tiny-sd3", entry, method, load_methods("methods.yaml")[method], nfe, tmp_path, num_samples=3,
                    batch_size=3, keep_noise=True, guidance=SCALE)
    assert cell["status"] == "ok"
    assert cell["nfe_measured"] == nfe and cell["network_evals"] == 2 * nfe  # each guided call: two passes
    with np.load(tmp_path / "samples.npz") as saved:
        noise, latents, images = (torch.from_numpy(saved[k]) for k in ("noise", "latents", "samples"))
        np.testing.assert_array_equal(saved["prompt_index"], prompt_indices(0, range(3), 3))

    t_min, t_max = make_process(PROCESS).t_range
    u = np.linspace(unshifted(t_max), unshifted(t_min), steps)  # uniform unshifted flow time, as diffusers' grid
    pipe = pipeline(sd3_folder)
    if method.startswith("euler"):
        grid = {"sigmas": list(u)}  # FlowMatchEulerDiscreteScheduler shifts them by its config's shift 3
    else:
        pipe.scheduler = install_heun(FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config), shifted(u))
        grid = {"num_inference_steps": steps}
    with torch.inference_mode():
        expected = pipe(SEED0_PROMPTS, guidance_scale=SCALE, latents=t_max * noise, output_type="latent",
                        max_sequence_length=T5_TOKENS, **grid).images
        decoded = pipe.vae.decode(expected / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    assert relative(latents, expected) <= RTOL
    assert relative(images, decoded) <= RTOL


def test_unguided_cell_is_one_pass_per_evaluation(sd3_folder, tmp_path):
    method = load_methods("methods.yaml")["euler_flow_shift3"]
    cell = run_cell("tiny-sd3", spec(sd3_folder), "euler_flow_shift3", method, 4, tmp_path, num_samples=2, batch_size=2)
    assert cell["status"] == "ok" and cell["nfe_measured"] == 4 and cell["network_evals"] == 4


def one_line_error(entry, match):
    with pytest.raises(ConfigError, match=match) as err:
        check_model(entry)
    assert "\n" not in str(err.value)


def edited_copy(folder, tmp_path, path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / path).read_text())
    (copy / path).write_text(json.dumps({**config, **changes}))
    return copy


def test_a_pipeline_of_another_class_is_one_line(sd3_folder, tmp_path):
    edited = edited_copy(sd3_folder, tmp_path, "model_index.json", _class_name="StableDiffusionXLPipeline")
    one_line_error(spec(edited), r"^diffusers_sd3: .* is a StableDiffusionXLPipeline folder, not one of "
                                 r"StableDiffusion3Pipeline; adapter diffusers_sdxl takes it$")
    one_line_error({**spec(sd3_folder), "adapter": "diffusers_sd"},
                   r"is a StableDiffusion3Pipeline folder, not one of StableDiffusionPipeline; "
                   r"adapter diffusers_sd3 takes it$")


def test_refusals_at_planning(sd3_folder, tmp_path):
    one_line_error(spec(sd3_folder, process={"kind": "rectified_flow"}),
                   r"process \(rectified_flow, shift 1\) disagrees with the checkpoint's scheduler config \(shift 3\)$")
    one_line_error(spec(sd3_folder, process={"kind": "edm"}), "its process kind is rectified_flow, not edm$")
    one_line_error(spec(sd3_folder, process={"kind": "rectified_flow", "shift": 0}), "shift must be a positive number")
    one_line_error(spec(sd3_folder, params={"max_sequence_length": 1024}), "max_sequence_length is the number of T5")
    one_line_error(spec(sd3_folder, params={"prediction": "eps"}), "predicts the flow velocity")
    one_line_error({k: v for k, v in spec(sd3_folder).items() if k != "prompts"}, r"prompts' missing")
    edited = edited_copy(sd3_folder, tmp_path, "transformer/config.json", pooled_projection_dim=48)
    one_line_error(spec(edited), "text encoders do not fit its transformer: .* pooled projections 32 for "
                                 "pooled_projection_dim 48$")
