"""The diffusers_sdxl adapter (Stable Diffusion XL) on a tiny random StableDiffusionXLPipeline folder.

A seeded UNet2DConditionModel with SDXL's added conditions (addition_embed_type text_time), an AutoencoderKL, a
CLIPTextModel and a CLIPTextModelWithProjection of other widths (so the concatenation on the width shows), and the
single-letter CLIP tokenizers of test_diffusers_sd go through StableDiffusionXLPipeline.save_pretrained into a temp
folder, and the adapter loads it as models.yaml's entry would a hub id.

Cross-checks in float32 against StableDiffusionXLPipeline itself, with the captions a seed-0 cell gives and the same
guidance scale, from the same latents: the conditions are encode_prompt's outputs and _get_add_time_ids', the null
condition its negative embeddings (zeros under force_zeros_for_empty_prompt, the empty caption encoded without it);
dpmpp_2m against DPMSolverMultistepScheduler and euler against EulerDiscreteScheduler under guidance, and the decoded
images against the pipeline's VAE decode. A cell through run_cell checks the NFE audit under guidance.
params.unet_weights (DMD2's UNet-only weights on SDXL base) loads the same network as a folder whose unet/ holds
those weights, and its refusals are one line.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file  # noqa: E402
from test_diffusers_sd import (SD_BETAS, SD_PROCESS, guided_beside_pipeline, scheduler_overrides,  # noqa: E402
                               tiny_tokenizer)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from harness.cells import run_cell  # noqa: E402
from harness.config import load_methods  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.guidance import guided  # noqa: E402
from harness.methods.solvers import dpmpp_2m, euler  # noqa: E402
from harness.metrics.text_alignment import prompt_indices  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402
from harness.models.diffusers_sdxl import pipeline_files  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:__array__ implementation:DeprecationWarning")

PROMPTS = ["a red cat", "two dogs", "a boat at sea"]
# the captions stepbench gives a seed-0 cell's samples 0, 1, 2 (they depend on (seed, i)): the pipeline gets them too
SEED0_PROMPTS = [PROMPTS[k] for k in prompt_indices(0, range(len(PROMPTS)), len(PROMPTS))]
WIDTHS = (16, 12)  # text_encoder's and text_encoder_2's hidden widths: the UNet's cross_attention_dim is their sum
PROJECTION, TIME_WIDTH = 8, 4  # text_encoder_2's projection_dim, the UNet's addition_time_embed_dim
SCALE = 4.0
RTOL = 1e-4


def clip_config(hidden, **extra):
    return CLIPTextConfig(vocab_size=54, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **extra)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=sum(WIDTHS),
                                norm_num_groups=4, attention_head_dim=2, addition_embed_type="text_time",
                                addition_time_embed_dim=TIME_WIDTH,
                                projection_class_embeddings_input_dim=6 * TIME_WIDTH + PROJECTION)


def save_tiny_sdxl(folder, unet=None):
    unet = unet or tiny_unet()
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.13025)
    text_encoder = CLIPTextModel(clip_config(WIDTHS[0]))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(WIDTHS[1], projection_dim=PROJECTION))
    tokenizer = tiny_tokenizer(folder / "tokenizer-src")
    # as SDXL base's scheduler config: Euler, leading spacing
    scheduler = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                              add_watermarker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


def spec(source, **extra):
    return {"adapter": "diffusers_sdxl", "source": str(source), "process": SD_PROCESS, "metrics": [],
            "prompts": PROMPTS, **extra}


def pipeline(folder, scheduler=None):
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **scheduler_overrides(scheduler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def relative(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm())


def edited_copy(folder, tmp_path, path, **changes):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / path).read_text())
    (copy / path).write_text(json.dumps({**config, **changes}))
    return copy


def pipeline_conditions(pipe, prompts):
    """The pipeline's (conditional, negative) UNet inputs as dicts of ours."""
    with torch.inference_mode():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=embeds.dtype,
                                      text_encoder_projection_dim=PROJECTION).repeat(len(prompts), 1)
    return ({"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids},
            {"encoder_hidden_states": negative, "text_embeds": negative_pooled, "time_ids": time_ids})


def assert_conditions_equal(ours, theirs):
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key])


def test_loads_and_encodes_prompts_as_the_pipeline(sdxl_folder):
    check_model(spec(sdxl_folder))
    denoiser = load_denoiser(spec(sdxl_folder))
    assert denoiser.info.latent and denoiser.info.data_shape == (4, 8, 8) and denoiser.info.prediction == "eps"
    cond = denoiser.conditions(0, range(5))
    assert cond["encoder_hidden_states"].shape == (5, 12, sum(WIDTHS))  # 12 tokens, both widths side by side
    assert cond["text_embeds"].shape == (5, PROJECTION)
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 5  # 8 x 8 latents, VAE scale factor 2
    which = list(prompt_indices(0, range(5), 3))  # sample 3's caption is one of samples 0-2's
    torch.testing.assert_close(cond["encoder_hidden_states"][3], cond["encoder_hidden_states"][which.index(which[3])])
    np.testing.assert_array_equal(denoiser.condition_record(0, 5)["prompt_index"], which)

    conditional, negative = pipeline_conditions(pipeline(sdxl_folder), SEED0_PROMPTS)
    ours = denoiser.conditions(0, range(3))
    assert_conditions_equal(ours, conditional)
    null = denoiser.null_condition(ours)
    assert float(negative["encoder_hidden_states"].abs().max()) == 0  # force_zeros_for_empty_prompt (the default)
    assert_conditions_equal(null, negative)
    # the random network reads its prompt: the conditional and unconditional predictions differ
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert relative(denoiser(x, 1.0, ours), denoiser(x, 1.0, null)) > 1e-2
    assert denoiser.decode(torch.zeros(3, 4, 8, 8)).shape == (3, 3, 16, 16)


def test_without_force_zeros_the_null_condition_is_the_empty_caption(sdxl_folder, tmp_path):
    folder = edited_copy(sdxl_folder, tmp_path, "model_index.json", force_zeros_for_empty_prompt=False)
    denoiser = load_denoiser(spec(folder))
    conditional, negative = pipeline_conditions(pipeline(folder), SEED0_PROMPTS)
    null = denoiser.null_condition(denoiser.conditions(0, range(3)))
    assert float(null["encoder_hidden_states"].abs().min()) > 0 and float(null["text_embeds"].abs().max()) > 0
    assert_conditions_equal(null, negative)
    with pytest.raises(ConfigError, match="force_zeros_for_empty_prompt is true or false"):
        check_model(spec(edited_copy(sdxl_folder, tmp_path / "b", "model_index.json",
                                     force_zeros_for_empty_prompt="yes")))


def test_float16_vae_decodes_in_float32_under_force_upcast(sdxl_folder, tmp_path):
    """As the pipeline upcasts SDXL's VAE (it overflows in half precision); the networks stay float16."""
    half = load_denoiser(spec(sdxl_folder, params={"dtype": "float16"}))
    assert half.module.dtype == torch.float16 and half.text_encoders[1].dtype == torch.float16
    assert half.vae.dtype == torch.float32 and half.time_ids.dtype == torch.float16
    folder = edited_copy(sdxl_folder, tmp_path, "vae/config.json", force_upcast=False)
    assert load_denoiser(spec(folder, params={"dtype": "float16"})).vae.dtype == torch.float16
    assert load_denoiser(spec(folder, params={"dtype": "bfloat16"})).vae.dtype == torch.bfloat16


@pytest.mark.parametrize("scheduler,solver", [(DPMSolverMultistepScheduler, dpmpp_2m), (EulerDiscreteScheduler, euler)])
def test_guided_solvers_match_the_pipeline(sdxl_folder, scheduler, solver):
    got, expected, decoded, images = guided_beside_pipeline(load_denoiser(spec(sdxl_folder)),
                                                            pipeline(sdxl_folder, scheduler), solver, SCALE, 6)
    assert relative(got, expected) <= RTOL
    assert relative(decoded, images) <= RTOL


def test_a_guided_cell_counts_nfe_and_network_passes(sdxl_folder, tmp_path):
    methods = load_methods("methods.yaml")
    cell = run_cell("tiny-sdxl", spec(sdxl_folder), "dpmpp_2m", methods["dpmpp_2m"], 5, tmp_path, num_samples=4,
                    batch_size=3, guidance=3.0)
    assert cell["status"] == "ok"
    assert cell["nfe_measured"] == 5 and cell["network_evals"] == 10  # each guided call: two passes
    with np.load(tmp_path / "samples.npz") as saved:
        assert saved["samples"].shape == (4, 3, 16, 16) and saved["latents"].shape == (4, 4, 8, 8)
        np.testing.assert_array_equal(saved["prompt_index"], prompt_indices(cell["seed"], range(4), len(PROMPTS)))
    unguided = run_cell("tiny-sdxl", spec(sdxl_folder), "dpmpp_2m", methods["dpmpp_2m"], 5, tmp_path / "w1",
                        num_samples=4, batch_size=3)
    assert unguided["nfe_measured"] == 5 and unguided["network_evals"] == 5


# ---- params.unet_weights: a UNet published apart from its pipeline (DMD2 on SDXL base) ----

def guided_latents(entry):
    denoiser = load_denoiser(entry)
    model = guided(denoiser, SCALE)
    sigmas = [float(denoiser.process.sigmas[t]) for t in (999, 749, 499, 249)] + [0.0]
    cond = denoiser.conditions(0, range(3))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return dpmpp_2m(lambda x, sigma: model(x, sigma, cond), x, sigmas)


@pytest.fixture(scope="module")
def student(sdxl_folder, tmp_path_factory):
    """(base folder without unet/'s weights, weights folder, folder whose unet/ holds the student's weights)."""
    root = tmp_path_factory.mktemp("student")
    unet = tiny_unet(seed=5)  # other weights than the base's
    weights = root / "weights"
    weights.mkdir()
    torch.save(unet.state_dict(), weights / "unet_fp16.bin")  # DMD2's format: a pickled state dict
    save_file(unet.state_dict(), weights / "unet.safetensors")
    base = root / "base"
    shutil.copytree(sdxl_folder, base)
    (base / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # not read when unet_weights replaces it
    return base, weights, save_tiny_sdxl(root / "merged", unet)


def test_unet_weights_load_the_same_network_as_a_folder_holding_them(student):
    base, weights, merged = student
    expected = guided_latents(spec(merged))
    pickled = spec(base, params={"allow_pickle": True,
                                 "unet_weights": {"source": str(weights), "file": "unet_fp16.bin"}})
    check_model(pickled)
    assert torch.equal(guided_latents(pickled), expected)
    safe = spec(base, params={"unet_weights": {"source": str(weights), "file": "unet.safetensors"}})
    check_model(safe)
    assert torch.equal(guided_latents(safe), expected)
    with pytest.raises(ConfigError, match=r"base/unet has no weights file"):  # without unet_weights, unet/'s are read
        check_model(spec(base))


def one_line_error(entry, match, attempt=check_model):
    with pytest.raises(ConfigError, match=match) as err:
        attempt(entry)
    assert "\n" not in str(err.value)


def test_unet_weights_refusals(student, tmp_path):
    base, weights, _ = student
    state = tiny_unet(seed=5).state_dict()
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, tmp_path / "partial.safetensors")
    torch.save({k: v for k, v in state.items() if k != dropped}, tmp_path / "partial.bin")

    def entry(file, source=tmp_path, **params):
        return spec(base, params={"unet_weights": {"source": str(source), "file": file}, **params})

    missing = rf"the weights in .*partial\.(safetensors|bin) do not fit its UNet2DConditionModel config: 1 missing " \
              rf"\(first: {dropped}\) weights; refusing to sample a partly random network$"
    one_line_error(entry("partial.safetensors"), missing)  # at planning: the safetensors header tells
    check_model(entry("partial.bin", allow_pickle=True))  # a pickle is read only when it loads
    one_line_error(entry("partial.bin", allow_pickle=True), missing, load_denoiser)
    one_line_error(entry("unet_fp16.bin", weights), r"params.unet_weights: .*unet_fp16.bin is a pickle \(loading one "
                                                    r"can run code\); .* set params.allow_pickle: true")
    one_line_error(entry("nope.safetensors"), r"params.unet_weights: .*nope.safetensors not found$")
    (tmp_path / "broken.safetensors").write_bytes(b"not a header")
    (tmp_path / "broken.bin").write_bytes(b"not a pickle")
    one_line_error(entry("broken.safetensors"), r"broken.safetensors is not a readable safetensors file")
    one_line_error(entry("broken.bin", allow_pickle=True), r"broken.bin cannot be read: ", load_denoiser)
    one_line_error(spec(base, params={"unet_weights": "dmd2.bin"}), r"params.unet_weights is \{source: a hub id")
    hub = {"source": "tianweiy/DMD2", "file": "dmd2_sdxl_4step_unet_fp16.bin"}
    one_line_error(spec(base, params={"unet_weights": hub, "allow_pickle": True, "cache_dir": str(tmp_path)}),
                   r"tianweiy/DMD2 is not in the Hugging Face cache .* `hf download tianweiy/DMD2 --include "
                   r"'dmd2_sdxl_4step_unet_fp16.bin' --cache-dir")


def test_uncached_hub_id_names_exactly_the_files_it_reads(tmp_path):
    def include(files):
        return " ".join(repr(f) for f in files).replace("*", r"\*")

    for params, replaced in (({}, False), ({"unet_weights": {"source": str(tmp_path), "file": "u.bin"}}, True)):
        one_line_error(spec("stabilityai/stable-diffusion-xl-base-1.0", params={**params, "cache_dir": str(tmp_path)}),
                       rf"`hf download stabilityai/stable-diffusion-xl-base-1.0 --include "
                       rf"{include(pipeline_files(replaced))} --cache-dir")
    assert "unet/diffusion_pytorch_model.safetensors" in pipeline_files(False)
    assert "unet/diffusion_pytorch_model.safetensors" not in pipeline_files(True)


def test_refusals_at_planning(sdxl_folder, tmp_path):
    one_line_error(spec(edited_copy(sdxl_folder, tmp_path / "a", "model_index.json",
                                    _class_name="StableDiffusionPipeline")),
                   r"^diffusers_sdxl: .* is a StableDiffusionPipeline folder, not one of StableDiffusionXLPipeline; "
                   r"adapter diffusers_sd takes it$")
    one_line_error({**spec(sdxl_folder), "adapter": "diffusers_sd"},
                   r"is a StableDiffusionXLPipeline folder, not one of StableDiffusionPipeline; adapter diffusers_sdxl "
                   r"takes it$")
    one_line_error(spec(sdxl_folder, process={**SD_PROCESS, "beta_schedule": "linear"}),
                   "disagrees with the checkpoint's scheduler config")
    one_line_error(spec(sdxl_folder, params={"prediction": "v"}), "params.prediction is 'v' but the checkpoint")
    one_line_error({k: v for k, v in spec(sdxl_folder).items() if k != "prompts"}, r"prompts' missing")
    one_line_error(spec(edited_copy(sdxl_folder, tmp_path / "b", "unet/config.json", addition_embed_type=None)),
                   r"unet/config.json has addition_embed_type None, not 'text_time'")
    one_line_error(spec(edited_copy(sdxl_folder, tmp_path / "c", "unet/config.json",
                                    projection_class_embeddings_input_dim=40)),
                   r"text encoders do not fit its UNet: .* for projection_class_embeddings_input_dim 40$")
    one_line_error(spec(edited_copy(sdxl_folder, tmp_path / "d", "tokenizer_2/tokenizer_config.json",
                                    model_max_length=8)), r"pad to 12 and 8 tokens")
    one_line_error(spec(edited_copy(sdxl_folder, tmp_path / "e", "text_encoder_2/config.json",
                                    architectures=["CLIPTextModel"])),
                   r"text_encoder_2/config.json names CLIPTextModel, not CLIPTextModelWithProjection")


def test_a_stitched_ssd1b_like_pair_runs_on_the_large_models_conditions(sdxl_folder, tmp_path):
    """T-Stitch with another UNet on the same text encoders (SSD-1B beside SDXL): the pair's conditions match and the
    evaluations split under guidance; with other text encoder weights the small model is refused in one line."""
    from harness.cells import run_cell

    small = save_tiny_sdxl(tmp_path / "small", unet=tiny_unet(seed=7))
    models = {"big": spec(sdxl_folder), "small": spec(small)}
    stitch = {**load_methods("methods.yaml")["tstitch_ssd1b_40_dpmpp_2m"],
              "stitch": {"small": "small", "fraction": 0.4, "base": "dpmpp_2m"}}
    cell = run_cell("big", models["big"], "stitch", stitch, 8, tmp_path / "s", num_samples=3, guidance=3.0,
                    models=models)
    passes = cell["evals_by_model"]
    assert cell["nfe_measured"] == 8 and passes["big"] + passes["small"] == 16 and 0 < passes["small"] < 16
    encoder = CLIPTextModelWithProjection.from_pretrained(small / "text_encoder_2")
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.5)
    encoder.save_pretrained(small / "text_encoder_2")
    with pytest.raises(ConfigError, match="^stitch: small cannot take the large model's conditions: its text encoder "
                                          "gives other embeddings of the same captions$"):
        run_cell("big", models["big"], "stitch", stitch, 8, tmp_path / "r", num_samples=3, models=models)
