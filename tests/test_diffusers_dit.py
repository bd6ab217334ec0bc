"""The diffusers_dit adapter (class-conditional latent DiT) on a tiny random DiT folder.

A seeded DiTTransformer2DModel with a learned sigma (out_channels = 2 x in_channels) and a tiny AutoencoderKL
go through DiTPipeline.save_pretrained into a temp folder. stepbench's solvers under classifier-free guidance
(the null class 1000, as DiTPipeline's) are cross-checked in float32 against DiTPipeline itself, from the same
latents (its generator's draw) with the same labels: dpmpp_2m against DPMSolverMultistepScheduler, euler
against DDIMScheduler.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
)

from harness.config import load_methods  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.guidance import guided  # noqa: E402
from harness.methods.solvers import dpmpp_2m, euler  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore:__array__ implementation:DeprecationWarning")
BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
PROCESS = {"kind": "vp_discrete", **BETAS}
RTOL = 1e-4


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-dit")
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**BETAS)).save_pretrained(folder)
    return folder


def spec(source, **extra):
    return {"adapter": "diffusers_dit", "source": str(source), "process": PROCESS, "metrics": [], "classes": 1000,
            **extra}


@pytest.mark.parametrize("scheduler,solver", [(DPMSolverMultistepScheduler, dpmpp_2m), (DDIMScheduler, euler)])
def test_guided_solvers_match_the_pipeline(dit_folder, scheduler, solver):
    steps, scale, labels = 6, 4.0, [3, 999, 42]
    denoiser = load_denoiser(spec(dit_folder))
    assert denoiser.info.latent and denoiser.info.data_shape == (4, 8, 8) and denoiser.info.null_class == 1000
    pipe = DiTPipeline.from_pretrained(dit_folder)
    overrides = dict(final_sigmas_type="zero", lower_order_final=True) if scheduler is DPMSolverMultistepScheduler \
        else dict(set_alpha_to_one=True, clip_sample=False)  # DDIM clips x0 to [-1, 1] by default
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))  # the pipeline's own draw
    with torch.inference_mode():
        expected = pipe(labels, guidance_scale=scale, num_inference_steps=steps, output_type="np",
                        generator=torch.Generator().manual_seed(5)).images
        pipe.scheduler.set_timesteps(steps)
        process = denoiser.process
        sigmas = [float(process.sigmas[int(t)]) for t in pipe.scheduler.timesteps] + [0.0]
        model, cond = guided(denoiser, scale), torch.tensor(labels)
        z0 = solver(lambda x, sigma: model(x, sigma, cond), x_T / float(process.alpha(sigmas[0])), sigmas)
        got = (denoiser.decode(z0) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= RTOL


def test_a_guided_cell_counts_nfe_and_network_passes(dit_folder, tmp_path):
    from harness.cells import run_cell

    methods = load_methods("methods.yaml")
    cell = run_cell("tiny-dit", spec(dit_folder), "dpmpp_2m", methods["dpmpp_2m"], 4, tmp_path, num_samples=3,
                    batch_size=2, guidance=2.0)
    assert cell["status"] == "ok" and cell["nfe_measured"] == 4 and cell["network_evals"] == 8
    with np.load(tmp_path / "samples.npz") as saved:
        assert saved["samples"].shape == (3, 3, 16, 16) and saved["latents"].shape == (3, 4, 8, 8)
        assert saved["labels"].shape == (3,)


def test_refusals_at_planning(dit_folder):
    with pytest.raises(ConfigError, match=r"transformer has 1000 classes .* says classes: 10$"):
        check_model(spec(dit_folder, classes=10))
    with pytest.raises(ConfigError, match=r"is a DiTPipeline folder \(its vae makes it a latent model\).*"
                                          r"adapter diffusers_dit takes it$"):
        check_model({**spec(dit_folder), "adapter": "diffusers_unet"})


def test_a_folder_that_names_transformer2dmodel_loads_the_same_network(dit_folder, tmp_path):
    """facebook/DiT-XL-2-256 was saved before DiTTransformer2DModel existed: its config says Transformer2DModel."""
    import json
    import shutil

    shutil.copytree(dit_folder, tmp_path / "old", dirs_exist_ok=True)
    config = tmp_path / "old" / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "Transformer2DModel"}))
    check_model(spec(tmp_path / "old"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([5, 7])
    old, new = load_denoiser(spec(tmp_path / "old")), load_denoiser(spec(dit_folder))
    assert torch.equal(old(x, 3.0, cond), new(x, 3.0, cond))
