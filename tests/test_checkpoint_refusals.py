"""Loading refuses what it cannot do faithfully (harness.models.checkpoint), in one line, at planning where the
config files alone show it.

Each case is a tiny random checkpoint saved with save_pretrained into a temp folder, as a new user would try it:
a Stable Diffusion folder, a DiT folder, an LDM (VQ latent) folder and weights that do not fit their config given
to the pixel adapter; an uncached hub id; a pickle checkpoint without `allow_pickle`.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTTransformer2DModel,
    LDMPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from safetensors.torch import load_file, save_file  # noqa: E402

from harness.errors import ConfigError  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

LINEAR = {"kind": "vp_discrete", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "num_train_timesteps": 1000}


def tiny_unet(in_channels=3):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def scheduler():
    return DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)


def spec(source, **params):
    return {"adapter": "diffusers_unet", "source": str(source), "process": LINEAR, "metrics": [], "params": params}


def refused(entry, match):
    """The same one line at planning (config files only) and at load."""
    for attempt in (check_model, load_denoiser):
        with pytest.raises(ConfigError, match=match) as err:
            attempt(entry)
        assert "\n" not in str(err.value)


def test_conditional_unet_folder_names_its_class_and_adapter(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=4, attention_head_dim=2)
    unet.save_pretrained(tmp_path / "unet")
    scheduler().save_pretrained(tmp_path / "scheduler")
    # the cause is the unet's class, not a missing top-level config.json (what the last attempt said before)
    refused(spec(tmp_path, subfolder="unet"),
            r"unet/config.json names UNet2DConditionModel, not UNet2DModel; adapter diffusers_sd takes it$")


def test_dit_folder_is_refused_not_built_as_a_random_unet(tmp_path):
    torch.manual_seed(0)
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, num_layers=1, sample_size=8,
                          patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4).save_pretrained(
        tmp_path / "transformer")
    scheduler().save_pretrained(tmp_path / "transformer")
    refused(spec(tmp_path, subfolder="transformer"),
            r"transformer/config.json names DiTTransformer2DModel, not UNet2DModel; adapter diffusers_dit takes it$")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    """A DiT's weights under a config that says UNet2DModel: diffusers would build a default UNet2DModel and
    initialise every weight at random (the cell came out NaN, 'diverged'). Also one weight dropped from a real
    UNet's file: that one would be random."""
    torch.manual_seed(0)
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4, num_layers=1,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4).save_pretrained(
        tmp_path / "dit")
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    (tmp_path / "dit" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    scheduler().save_pretrained(tmp_path / "dit")
    check_model(spec(tmp_path / "dit"))  # the config files agree; only the weights tell
    with pytest.raises(ConfigError, match=r"do not fit its UNet2DModel config: \d+ missing .*\d+ unexpected .*"
                                          r"refusing to sample a partly random network$"):
        load_denoiser(spec(tmp_path / "dit"))

    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "ddpm")
    weights = tmp_path / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)
    with pytest.raises(ConfigError, match=rf"1 missing \(first: {dropped}\) weights; refusing"):
        load_denoiser(spec(tmp_path / "ddpm"))


def test_ldm_folder_is_not_read_as_pixels(tmp_path):
    torch.manual_seed(0)
    vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,), layers_per_block=1,
                    norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=3)
    LDMPipeline(vqvae=vqvae, unet=tiny_unet(), scheduler=DDIMScheduler(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02)).save_pretrained(tmp_path)
    refused(spec(tmp_path), r"is a LDMPipeline folder \(its vqvae makes it a latent model\), not one of "
                            r"ConsistencyModelPipeline, DDIMPipeline, DDPMPipeline, PNDMPipeline; no stepbench "
                            r"adapter takes it yet$")


def test_uncached_hub_id_says_what_to_download_and_where(tmp_path):
    refused(spec("google/ddpm-cifar10-32", cache_dir=str(tmp_path)),
            rf"google/ddpm-cifar10-32 is not in the Hugging Face cache \({tmp_path}\).*fetch it once with "
            rf"`hf download google/ddpm-cifar10-32 --include '\*.json' 'diffusion_pytorch_model.safetensors' .*"
            rf"--cache-dir {tmp_path}`")


def test_pickle_weights_need_allow_pickle(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path, safe_serialization=False)
    scheduler().save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    refused(spec(tmp_path), r"holds only diffusion_pytorch_model.bin, a pickle .* set params.allow_pickle: true")
    check_model(spec(tmp_path, allow_pickle=True))
    denoiser = load_denoiser(spec(tmp_path, allow_pickle=True))
    for name, value in unet.state_dict().items():  # every weight is the saved one
        assert torch.equal(denoiser.module.state_dict()[name], value)
    with pytest.raises(ConfigError, match="params.allow_pickle is true or false"):
        check_model(spec(tmp_path, allow_pickle="yes"))


def test_allow_pickle_still_loads_safetensors(tmp_path):
    """allow_pickle allows a pickle, it does not ask for one: a folder of safetensors loads them (dmd2-sdxl-1step sets
    it for its UNet's .bin and reads SDXL base's safetensors)."""
    unet = tiny_unet()
    DDPMPipeline(unet=unet, scheduler=scheduler()).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("unet/*.bin"))
    denoiser = load_denoiser({**spec(tmp_path, allow_pickle=True), "process": LINEAR})
    for name, value in unet.state_dict().items():
        assert torch.equal(denoiser.module.state_dict()[name], value)
