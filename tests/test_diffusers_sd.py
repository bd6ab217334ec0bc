"""The diffusers_sd adapter (latent text-to-image) on a tiny random Stable Diffusion folder.

A seeded UNet2DConditionModel, AutoencoderKL and CLIPTextModel with a CLIPTokenizer built here from a tiny
vocabulary go through StableDiffusionPipeline.save_pretrained into a temp folder, and the adapter loads it as it
would a hub checkpoint. stepbench's solvers under classifier-free guidance are cross-checked in float32 against
StableDiffusionPipeline itself, from the same latents with the same prompts: dpmpp_2m against
DPMSolverMultistepScheduler, euler against EulerDiscreteScheduler (the same ODE step: DDIM). A cell through
run_cell checks the NFE audit under guidance and what samples.npz records.
"""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from harness.config import load_methods  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.guidance import guided  # noqa: E402
from harness.metrics.text_alignment import prompt_indices  # noqa: E402
from harness.methods.solvers import dpmpp_2m, euler  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:__array__ implementation:DeprecationWarning")

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_PROCESS = {"kind": "vp_discrete", **SD_BETAS}
PROMPTS = ["a red cat", "two dogs", "a boat at sea"]
# the captions stepbench gives a seed-0 cell's samples 0, 1, 2 (they depend on (seed, i)): the pipeline gets them too
SEED0_PROMPTS = [PROMPTS[k] for k in prompt_indices(0, range(len(PROMPTS)), len(PROMPTS))]
RTOL = 1e-4


def tiny_tokenizer(folder):
    """A CLIPTokenizer over single letters (no merges): every word is its letters, the last with </w>."""
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + [
        f"{c}</w>" for c in string.ascii_lowercase]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)


def save_tiny_sd(folder, prediction_type="epsilon", mid_block=True):
    """`mid_block=False`: a BK-SDM-like UNet (no mid-block, other weights) beside the same VAE and text encoder."""
    torch.manual_seed(0 if mid_block else 3)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2,
                                mid_block_type="UNetMidBlock2DCrossAttn" if mid_block else None)
    torch.manual_seed(1)  # each part seeded apart: the VAE and text encoder do not depend on the UNet's size
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    scheduler = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def spec(source, **extra):
    return {"adapter": "diffusers_sd", "source": str(source), "process": SD_PROCESS, "metrics": [],
            "prompts": PROMPTS, **extra}


def pipeline(folder, scheduler):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **scheduler_overrides(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler_overrides(scheduler):
    if scheduler is DPMSolverMultistepScheduler:
        return dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                    final_sigmas_type="zero", use_karras_sigmas=False)
    return dict(timestep_spacing="leading")  # its init_noise_sigma is then sqrt(sigma_max^2 + 1): x~ = x_T / alpha


def test_loads_as_a_latent_text_model(sd_folder):
    check_model(spec(sd_folder))
    denoiser = load_denoiser(spec(sd_folder))
    assert denoiser.info.latent and denoiser.info.data_shape == (4, 8, 8)
    assert denoiser.info.prediction == "eps"
    cond = denoiser.conditions(0, range(5))
    assert cond.shape == (5, 12, 16)
    which = prompt_indices(0, range(5), len(PROMPTS))  # the captions of seed 0's samples
    for i in range(5):
        torch.testing.assert_close(cond[i], denoiser.encode([PROMPTS[which[i]]])[0])
    torch.testing.assert_close(denoiser.conditions(0, [3, 4]), cond[3:])  # whatever the batch
    np.testing.assert_array_equal(denoiser.condition_record(0, 5)["prompt_index"], which)
    other = denoiser.condition_record(1, 30)["prompt_index"]  # another seed of the grid, other captions
    assert not np.array_equal(other, denoiser.condition_record(0, 30)["prompt_index"])
    assert denoiser.decode(torch.zeros(3, 4, 8, 8)).shape == (3, 3, 16, 16)


@pytest.mark.parametrize("steps", [6])
@pytest.mark.parametrize("scheduler,solver", [(DPMSolverMultistepScheduler, dpmpp_2m), (EulerDiscreteScheduler, euler)])
def test_guided_solvers_match_the_pipeline(sd_folder, scheduler, solver, steps):
    got, expected, decoded, images = guided_beside_pipeline(load_denoiser(spec(sd_folder)),
                                                            pipeline(sd_folder, scheduler), solver, 4.0, steps)
    assert float((got - expected).norm() / expected.norm()) <= RTOL
    assert float((decoded - images).norm() / images.norm()) <= RTOL


def guided_beside_pipeline(denoiser, pipe, solver, scale, steps):
    """(stepbench's latents, the pipeline's, stepbench's decoded images, the pipeline's): the same x_T, the captions
    of a seed-0 cell's first 3 samples and guidance, stepbench's solver at the pipeline scheduler's time steps."""
    x_T = torch.randn(3, *denoiser.info.data_shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = pipe(SEED0_PROMPTS, num_inference_steps=steps, guidance_scale=scale, latents=x_T.clone(),
                        output_type="latent").images
        pipe.scheduler.set_timesteps(steps)
        process = denoiser.process
        sigmas = [float(process.sigmas[int(t)]) for t in pipe.scheduler.timesteps] + [0.0]
        model = guided(denoiser, scale)
        cond = denoiser.conditions(0, range(3))
        got = solver(lambda x, sigma: model(x, sigma, cond), x_T / float(process.alpha(sigmas[0])), sigmas)
        images = pipe.vae.decode(expected / pipe.vae.config.scaling_factor).sample
        return got, expected, denoiser.decode(got), images


def test_a_guided_cell_counts_nfe_and_network_passes(sd_folder, tmp_path):
    from harness.cells import run_cell

    methods = load_methods("methods.yaml")
    cell = run_cell("tiny-sd", spec(sd_folder, num_samples=4, batch_size=3), "dpmpp_2m", methods["dpmpp_2m"], 5,
                    tmp_path, num_samples=4, guidance=3.0)
    assert cell["status"] == "ok"
    assert cell["nfe_measured"] == 5 and cell["network_evals"] == 10  # each guided call: two passes
    with np.load(tmp_path / "samples.npz") as saved:
        assert saved["samples"].shape == (4, 3, 16, 16) and saved["latents"].shape == (4, 4, 8, 8)
        np.testing.assert_array_equal(saved["prompt_index"], prompt_indices(cell["seed"], range(4), len(PROMPTS)))
    unguided = run_cell("tiny-sd", spec(sd_folder), "dpmpp_2m", methods["dpmpp_2m"], 5, tmp_path / "w1",
                        num_samples=4, batch_size=3)
    assert unguided["nfe_measured"] == 5 and unguided["network_evals"] == 5


def test_v_prediction_comes_from_the_scheduler_config(tmp_path):
    folder = save_tiny_sd(tmp_path / "sd2", prediction_type="v_prediction")  # SD 2.x at 768
    assert load_denoiser(spec(folder)).info.prediction == "v"


def test_refusals_at_planning(sd_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"is a StableDiffusionPipeline folder .*; adapter diffusers_sd takes it$"):
        check_model({**spec(sd_folder), "adapter": "diffusers_unet", "prompts": None})
    with pytest.raises(ConfigError, match="disagrees with the checkpoint's scheduler config"):
        check_model(spec(sd_folder, process={**SD_PROCESS, "beta_schedule": "linear"}))
    with pytest.raises(ConfigError, match=r"prompts' missing"):
        check_model({k: v for k, v in spec(sd_folder).items() if k != "prompts"})
    (tmp_path / "coco.json").write_text(json.dumps({"annotations": [{"caption": "a cat "}, {"caption": "a dog"}]}))
    assert load_denoiser(spec(sd_folder, prompts=str(tmp_path / "coco.json"))).prompts == ["a cat", "a dog"]


def test_a_stitched_pair_of_text_models_runs_on_the_large_models_captions(sd_folder, tmp_path):
    """T-Stitch with a BK-SDM-like small UNet before the tiny SD one, under guidance: the evaluations split on the
    noise level, and at fraction 1 the cell is the small model's own cell (same captions, same noise)."""
    from harness.cells import run_cell

    small = save_tiny_sd(tmp_path / "tiny-bksdm", mid_block=False)
    models = {"tiny-sd": spec(sd_folder), "tiny-bksdm": spec(small)}
    methods = load_methods("methods.yaml")
    stitch = {**methods["tstitch_bksdm_40_dpmpp_2m"], "stitch": {"small": "tiny-bksdm", "fraction": 0.4,
                                                                 "base": "dpmpp_2m"}}
    run = dict(num_samples=4, batch_size=3, guidance=3.0, models=models)
    cell = run_cell("tiny-sd", models["tiny-sd"], "stitch", stitch, 10, tmp_path / "s", **run)
    passes = cell["evals_by_model"]  # network passes: each guided evaluation is two, on whichever network
    assert cell["nfe_measured"] == 10 and passes["tiny-sd"] + passes["tiny-bksdm"] == 20 == cell["network_evals"]
    assert 0 < passes["tiny-bksdm"] < 20 and passes["tiny-bksdm"] % 2 == 0
    whole = {**stitch, "stitch": {**stitch["stitch"], "fraction": 1.0}}
    run_cell("tiny-sd", models["tiny-sd"], "stitch", whole, 6, tmp_path / "w", **run)
    run_cell("tiny-bksdm", models["tiny-bksdm"], "dpmpp_2m", methods["dpmpp_2m"], 6, tmp_path / "a", **run)
    a, b = (np.load(tmp_path / d / "samples.npz") for d in ("w", "a"))
    np.testing.assert_array_equal(a["samples"], b["samples"])
    np.testing.assert_array_equal(a["prompt_index"], b["prompt_index"])


def test_a_stitched_pair_with_another_text_encoder_is_refused(sd_folder, tmp_path):
    from harness.cells import run_cell

    folder = save_tiny_sd(tmp_path / "other", mid_block=False)
    torch.manual_seed(5)  # the same architecture, other weights: the captions would be embedded otherwise
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    for p in encoder.parameters():
        torch.nn.init.normal_(p)
    encoder.save_pretrained(folder / "text_encoder")
    models = {"tiny-sd": spec(sd_folder), "other": spec(folder)}
    stitch = {**load_methods("methods.yaml")["tstitch_bksdm_40_dpmpp_2m"],
              "stitch": {"small": "other", "fraction": 0.4, "base": "dpmpp_2m"}}
    with pytest.raises(ConfigError, match="^stitch: other cannot take the large model's conditions: its text encoder "
                                          "gives other embeddings of the same captions$"):
        run_cell("tiny-sd", models["tiny-sd"], "stitch", stitch, 6, tmp_path / "s", num_samples=2, models=models)
    with pytest.raises(ConfigError, match="its prompts differ$"):
        run_cell("tiny-sd", models["tiny-sd"], "stitch", {**stitch, "stitch": {**stitch["stitch"], "small": "sd2"}},
                 6, tmp_path / "p", num_samples=2, models={**models, "sd2": spec(sd_folder, prompts=["a cat"])})


def test_a_stitched_pair_with_other_captions_is_refused_at_planning(sd_folder, tmp_path):
    import yaml

    from harness.workflow import plan

    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"big": spec(sd_folder), "small": spec(sd_folder, prompts=["a cat"])}))
    methods = tmp_path / "methods.yaml"
    methods.write_text(yaml.safe_dump({
        "dpmpp_2m": load_methods("methods.yaml")["dpmpp_2m"],
        "st": {"family": "stitch", "stitch": {"small": "small", "fraction": 0.4, "base": "dpmpp_2m"}}}))
    config = {"models_file": str(models), "methods_file": str(methods), "results_dir": str(tmp_path / "r"),
              "models": ["big"], "methods": ["st"], "nfe": [5]}
    with pytest.raises(ConfigError, match="method 'st' runs 'small' beside 'big', whose prompts differ$"):
        plan(config)
