"""The diffusers_lcm adapter (latent consistency models, LCM and LCM-LoRA) on tiny random pipelines.

An LCM: a seeded UNet2DConditionModel with time_cond_proj_dim (the guidance embedding's input), with the tiny VAE,
CLIP text encoder and tokenizer of test_diffusers_sd, goes through LatentConsistencyModelPipeline.save_pretrained
with an LCMScheduler into a temp folder, and the adapter loads it as it would SimianLuo/LCM_Dreamshaper_v7. An
LCM-LoRA: a LoRA made with peft on the tiny SD UNet (random A and B, so it changes the network), saved in
diffusers' LoRA format (save_lora_weights) and fused by the adapter into test_diffusers_sd's tiny SD folder.

stepbench's `lcm_timesteps` samples are cross-checked in float32 against LatentConsistencyModelPipeline (the LCM,
at its guidance embedding) and against StableDiffusionPipeline with LCMScheduler after pipe.load_lora_weights +
fuse_lora (the LCM-LoRA), from the same latents with the same prompts. Between steps LCMScheduler.step draws its
re-noising noise with randn_tensor; the test patches scheduling_lcm.randn_tensor to return, in order, the draws
stepbench's per-sample noise object made (recorded as the sampler asked for them), so what is compared is the
procedure and the consistency function, not the random numbers. A scheduler config with timestep_scaling 0.001
makes c_skip large (0.2 at t = 999), so the boundary condition, read from the config, is seen.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")
import diffusers.schedulers.scheduling_lcm as lcm_scheduling  # noqa: E402
from diffusers import (  # noqa: E402
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from test_diffusers_sd import PROMPTS, SD_BETAS, SD_PROCESS, SEED0_PROMPTS, save_tiny_sd  # noqa: E402
from test_diffusers_sd import spec as sd_spec  # noqa: E402

from harness.config import load_methods  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.grid import expand_grid  # noqa: E402
from harness.guidance import guided  # noqa: E402
from harness.methods import make_sampler  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402
from harness.models.compiled import forget_compiled  # noqa: E402
from harness.models.diffusers_lcm import boundary_scalings, guidance_embedding  # noqa: E402
from harness.nfe import CountingDenoiser  # noqa: E402
from harness.noise import SampleNoise  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:__array__ implementation:DeprecationWarning")

RTOL = 1e-4
EMBEDDING = 16  # the tiny UNet's time_cond_proj_dim


def tiny_lcm_unet():
    torch.manual_seed(1)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2, time_cond_proj_dim=EMBEDDING)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def save_tiny_lcm(folder, sd_folder, timestep_scaling=10.0):
    """The tiny SD's VAE, text encoder and tokenizer around an LCM UNet, as a LatentConsistencyModelPipeline."""
    sd = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    LatentConsistencyModelPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                   unet=tiny_lcm_unet(),
                                   scheduler=LCMScheduler(**SD_BETAS, timestep_scaling=timestep_scaling),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lcm_folder(sd_folder, tmp_path_factory):
    return save_tiny_lcm(tmp_path_factory.mktemp("tiny-lcm"), sd_folder)


@pytest.fixture(scope="module", params=[10.0, 0.001], ids=["scaling10", "scaling0.001"])
def any_lcm_folder(request, sd_folder, lcm_folder, tmp_path_factory):
    """LCMScheduler's timestep_scaling (10) and one that makes c_skip large."""
    if request.param == 10.0:
        return lcm_folder
    return save_tiny_lcm(tmp_path_factory.mktemp("tiny-lcm-scaled"), sd_folder, request.param)


def save_lora(folder, unet, edit=None, targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A peft LoRA of the UNet's attention layers in diffusers' format, as diffusers' LoRA training scripts save
    one; edit(state) changes its tensors first."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(2)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=list(targets)))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: v.clone().contiguous() for k, v in state.items()}
    if edit is not None:
        state = edit(state)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def lora_folder(sd_folder, tmp_path_factory):
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    return save_lora(tmp_path_factory.mktemp("tiny-lora"), unet)


def spec(source, **extra):
    return {"adapter": "diffusers_lcm", "source": str(source), "process": SD_PROCESS, "metrics": [],
            "prompts": PROMPTS, **extra}


def lora_spec(sd_folder, lora, **params):
    return spec(sd_folder, params={"lora": {"source": str(lora)}, **params})


class RecordingNoise:
    """stepbench's per-sample noise, keeping each later draw the sampler makes for randn_tensor to hand back."""

    def __init__(self, seed, rows):
        self.inner, self.draws = SampleNoise(seed, rows), []

    def randn(self, shape, dtype=torch.float64):
        return self.inner.randn(shape, dtype)

    def randn_like(self, x):
        z = self.inner.randn_like(x)
        self.draws.append(z.clone())
        return z

    def randn_tensor(self, shape, generator=None, device=None, dtype=None, **_):
        assert tuple(shape) == tuple(self.draws[0].shape)
        return self.draws.pop(0).to(dtype=dtype)


def stepbench_lcm(denoiser, steps, guidance=1.0):
    """(samples, initial noise, noise record, measured NFE): lcm_timesteps on samples 0..2 of seed 0, as a cell."""
    noise = RecordingNoise(0, range(3))
    x_T = noise.randn(denoiser.info.data_shape, dtype=torch.float32)
    counted = CountingDenoiser(guided(denoiser, guidance))  # a guided evaluation is one NFE
    sampler = make_sampler(load_methods("methods.yaml")["lcm_timesteps"])
    out = sampler.sample(counted, x_T, steps, denoiser.conditions(0, range(3)), noise)
    return out, x_T, noise, counted.nfe_per_sample(3)


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_lcm_timesteps_are_lcm_schedulers():
    lists = load_methods("methods.yaml")["lcm_timesteps"]["params"]["timesteps"]
    scheduler = LCMScheduler(num_train_timesteps=1000)
    assert sorted(lists) == [1, 2, 4, 8]
    for nfe, timesteps in lists.items():
        scheduler.set_timesteps(nfe, original_inference_steps=50)
        assert timesteps == scheduler.timesteps.tolist()


def test_loads_an_lcm_with_its_guidance_embedding(lcm_folder):
    check_model(spec(lcm_folder))
    denoiser = load_denoiser(spec(lcm_folder))
    assert denoiser.info.latent and denoiser.info.prediction == "eps" and denoiser.info.data_shape == (4, 8, 8)
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_folder)
    for w in (8.5, 2.0, 3.7):
        theirs = pipe.get_guidance_scale_embedding(torch.tensor(w - 1).repeat(1), embedding_dim=EMBEDDING)
        assert torch.equal(guidance_embedding(w, EMBEDDING), theirs)
    assert torch.equal(denoiser.guidance_embedding, guidance_embedding(8.5, EMBEDDING))
    # the embedding reaches the network: another w is another consistency function
    other = load_denoiser(spec(lcm_folder, params={"lcm_guidance": 3.0}))
    x, cond = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), denoiser.conditions(0, range(3))
    assert relative(other(x, 2.0, cond), denoiser(x, 2.0, cond)) > 1e-3


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_timesteps_match_the_lcm_pipeline(any_lcm_folder, steps, monkeypatch):
    lcm_folder = any_lcm_folder
    denoiser = load_denoiser(spec(lcm_folder))
    ours, x_T, noise, nfe = stepbench_lcm(denoiser, steps)
    assert nfe == steps and len(noise.draws) == steps - 1
    monkeypatch.setattr(lcm_scheduling, "randn_tensor", noise.randn_tensor)
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_folder, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = pipe(SEED0_PROMPTS, num_inference_steps=steps, guidance_scale=8.5, latents=x_T.clone(),
                      output_type="latent").images
    assert not noise.draws  # the pipeline took every draw stepbench made
    assert relative(ours, theirs) <= RTOL
    scaling = pipe.scheduler.config.timestep_scaling
    if scaling < 1:  # c_skip is large here: the comparison sees the boundary condition
        assert boundary_scalings(999, scaling)[0] > 0.1


@pytest.mark.parametrize("steps,guidance", [(1, 1.0), (4, 1.0), (4, 3.0)])
def test_lcm_lora_matches_the_pipeline_with_the_lora_fused(sd_folder, lora_folder, steps, guidance, monkeypatch):
    check_model(lora_spec(sd_folder, lora_folder))
    denoiser = load_denoiser(lora_spec(sd_folder, lora_folder))
    assert denoiser.guidance_embedding is None
    ours, x_T, noise, nfe = stepbench_lcm(denoiser, steps, guidance)
    assert nfe == steps
    draws = list(noise.draws)  # for the second pipeline run
    monkeypatch.setattr(lcm_scheduling, "randn_tensor", noise.randn_tensor)
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        plain = pipe(SEED0_PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x_T.clone(),
                     output_type="latent").images
    noise.draws = draws
    pipe.load_lora_weights(str(lora_folder))
    pipe.fuse_lora()
    with torch.inference_mode():
        theirs = pipe(SEED0_PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x_T.clone(),
                      output_type="latent").images
    assert relative(ours, theirs) <= RTOL
    assert relative(plain, theirs) > 1e-2  # the LoRA changes the samples: the comparison sees it fused


def test_lora_refusals(sd_folder, lcm_folder, lora_folder, tmp_path):
    unet = lambda: UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")  # noqa: E731

    def rename(state):  # one LoRA layer on a module the UNet does not have
        return {k.replace("attn1.to_q.", "attn1.to_nothing."): v for k, v in state.items()}

    renamed = save_lora(tmp_path / "renamed", unet(), rename)
    check_model(lora_spec(sd_folder, renamed))  # its keys are the UNet's by name: found when the cell loads it
    with pytest.raises(ConfigError, match=r"tensors match no layer of .*to_nothing.*partly applied LoRA$"):
        load_denoiser(lora_spec(sd_folder, renamed))
    # convert_state_dict_to_diffusers renames the attention layers' keys (lora.down) but not proj_in's (lora_A):
    # diffusers reads the format from the first key and loads the proj_in layers alone, without a word
    mixed = save_lora(tmp_path / "mixed", unet(), targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in"))
    with pytest.raises(ConfigError, match=r"64 of its tensors match no layer"):
        load_denoiser(lora_spec(sd_folder, mixed))
    from safetensors.torch import load_file, save_file

    (tmp_path / "text").mkdir()  # a LoRA of the text encoder too (save_lora_weights would prefix it unet.)
    save_file({**load_file(lora_folder / "pytorch_lora_weights.safetensors"),
               "text_encoder.layer.lora.down.weight": torch.ones(2, 2)},
              tmp_path / "text" / "pytorch_lora_weights.safetensors")
    text = tmp_path / "text"
    with pytest.raises(ConfigError, match=r"1 keys that are not the UNet's \(first: text_encoder"):
        check_model(lora_spec(sd_folder, text))
    (tmp_path / "pickled").mkdir()
    torch.save({}, tmp_path / "pickled" / "lora.bin")
    entry = spec(sd_folder, params={"lora": {"source": str(tmp_path / "pickled"), "weight_name": "lora.bin"}})
    with pytest.raises(ConfigError, match="is a pickle"):
        check_model(entry)
    with pytest.raises(ConfigError, match="has no pytorch_lora_weights.safetensors"):
        check_model(lora_spec(sd_folder, tmp_path / "pickled"))
    with pytest.raises(ConfigError, match="params.lora is"):
        check_model(spec(sd_folder, params={"lora": str(lora_folder)}))
    with pytest.raises(ConfigError, match="is an LCM already"):
        check_model(lora_spec(lcm_folder, lora_folder))
    with pytest.raises(ConfigError, match="is a StableDiffusionPipeline folder, not an LCM .*params.lora"):
        check_model(spec(sd_folder))
    with pytest.raises(ConfigError, match=r"is a LatentConsistencyModelPipeline folder.*diffusers_lcm takes it$"):
        check_model({**spec(lcm_folder), "adapter": "diffusers_sd"})
    for part, file, change, message in [
            ("unet", "config.json", {"time_cond_proj_dim": None}, "no guidance embedding"),
            ("scheduler", "scheduler_config.json", {"clip_sample": True}, "sets clip_sample")]:
        edited = tmp_path / f"lcm-{part}"
        shutil.copytree(lcm_folder, edited)
        config = json.loads((edited / part / file).read_text())
        (edited / part / file).write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=message):
            check_model(spec(edited))
    with pytest.raises(ConfigError, match="lcm_guidance sets an LCM's guidance embedding"):
        check_model(lora_spec(sd_folder, lora_folder, lcm_guidance=8.5))
    with pytest.raises(ConfigError, match="lcm_guidance is the LCM's guidance scale"):
        check_model(spec(lcm_folder, params={"lcm_guidance": "high"}))


def test_the_compiled_table_keeps_the_fused_unet_apart_from_the_plain_one(sd_folder, lora_folder, monkeypatch):
    """sd15 and lcm-lora-sd15 read the same unet/ folder: with params.compile, a worker that ran one must not hand
    its compiled UNet to the other (torch.compile is stubbed: what is tested is the table's key, not Dynamo)."""
    monkeypatch.setattr(torch, "compile", lambda module, **_: module)
    forget_compiled()
    plain = load_denoiser(sd_spec(sd_folder, params={"compile": True}))
    fused = load_denoiser(lora_spec(sd_folder, lora_folder, compile=True))
    again = load_denoiser(lora_spec(sd_folder, lora_folder, compile=True))
    forget_compiled()
    assert fused.network is not plain.network and again.network is fused.network
    x, cond = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), plain.conditions(0, range(3))
    t = torch.full((3,), 500.0)
    assert relative(fused.unet_call(x, t, cond), plain.unet_call(x, t, cond)) > 1e-2


def test_grid_guidance_is_refused_on_an_lcm_and_kept_on_an_lcm_lora(sd_folder, lcm_folder, lora_folder, tmp_path):
    from harness.cells import run_cell

    models = {"tiny-lcm": spec(lcm_folder), "tiny-lcm-lora": lora_spec(sd_folder, lora_folder)}
    methods = load_methods("methods.yaml")
    grid = {"models": list(models), "methods": ["lcm_timesteps"], "nfe": [4], "guidance": [1, 3]}
    cells = {(c.model, c.guidance): c for c in expand_grid(grid, models, methods)}
    assert cells["tiny-lcm", 1.0].supported and cells["tiny-lcm-lora", 3.0].supported
    assert not cells["tiny-lcm", 3.0].supported
    assert cells["tiny-lcm", 3.0].reason == "guidance is in the LCM network (params.lcm_guidance)"
    with pytest.raises(ConfigError, match=r"^tiny-lcm: guidance 3: guidance is in the LCM network"):
        run_cell("tiny-lcm", models["tiny-lcm"], "lcm_timesteps", methods["lcm_timesteps"], 4, tmp_path / "w3",
                 num_samples=4, guidance=3.0)


def test_an_lcm_cell_counts_its_steps(lcm_folder, tmp_path):
    from harness.cells import run_cell

    methods = load_methods("methods.yaml")
    cell = run_cell("tiny-lcm", spec(lcm_folder, num_samples=4, batch_size=3), "lcm_timesteps",
                    methods["lcm_timesteps"], 4, tmp_path, num_samples=4)
    assert cell["status"] == "ok"
    assert cell["nfe_measured"] == 4 and cell["network_evals"] == 4  # one pass a step: the guidance is embedded
    with np.load(tmp_path / "samples.npz") as saved:
        assert saved["samples"].shape == (4, 3, 16, 16) and saved["latents"].shape == (4, 4, 8, 8)
        assert np.isfinite(saved["latents"]).all()
