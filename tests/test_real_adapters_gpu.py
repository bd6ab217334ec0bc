"""fp16 sampling of the tiny latent models (SD, SDXL, SD3, DiT, AudioLDM, LCM and LCM-LoRA) on CUDA agrees with
float32 on the CPU within fp16 tolerance, and with params.compile the torch.compile'd network agrees with the eager
one and is compiled once per process (`gpu` marker: run with `pytest -m gpu` where CUDA is present; skipped
elsewhere)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from test_diffusers_audioldm import audio_folder  # noqa: E402,F401  (fixture)
from test_diffusers_audioldm import spec as audio_spec  # noqa: E402
from test_diffusers_dit import dit_folder  # noqa: E402,F401  (fixture)
from test_diffusers_dit import spec as dit_spec  # noqa: E402
from test_diffusers_lcm import lcm_folder, lora_folder  # noqa: E402,F401  (fixtures)
from test_diffusers_lcm import lora_spec  # noqa: E402
from test_diffusers_lcm import spec as lcm_spec  # noqa: E402
from test_diffusers_sd import sd_folder  # noqa: E402,F401  (fixture)
from test_diffusers_sd import spec as sd_spec  # noqa: E402
from test_diffusers_sd3 import sd3_folder  # noqa: E402,F401  (fixture)
from test_diffusers_sd3 import spec as sd3_spec  # noqa: E402
from test_diffusers_sdxl import sdxl_folder  # noqa: E402,F401  (fixture)
from test_diffusers_sdxl import spec as sdxl_spec  # noqa: E402

from harness.guidance import guided  # noqa: E402
from harness.methods.solvers import dpmpp_2m  # noqa: E402
from harness.models import load_denoiser  # noqa: E402
from harness.models.compiled import forget_compiled  # noqa: E402
from harness.schedules import sigma_grid  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]
FP16_RTOL = 2e-2  # ~10 steps of half-precision rounding through a random network


def guided_samples(entry, device, dtype, cond_of, scale=3.0):
    denoiser = load_denoiser({**entry, "params": {**entry.get("params", {}), "dtype": dtype}}, device)
    model = guided(denoiser, scale)
    sigmas = list(sigma_grid(denoiser.process, 8, {"kind": "edm_rho", "rho": 7.0}))
    noise = torch.randn(4, *denoiser.info.data_shape, generator=torch.Generator().manual_seed(0))
    x = (noise * denoiser.process.prior_std(sigmas[0])).to(device, denoiser.info.dtype)
    cond = cond_of(denoiser)
    with torch.inference_mode():
        z0 = dpmpp_2m(lambda x, s: model(x, s, cond), x, sigmas)
        return denoiser.decode(z0).float().cpu()


def entry_and_conditions(kind, request):
    if kind == "lcm":  # its guidance is in the network (lcm_guidance)
        return lcm_spec(request.getfixturevalue("lcm_folder")), lambda d: d.conditions(0, range(4))
    if kind == "lcm-lora":  # fused into the tiny SD UNet in the dtype it runs in
        entry = lora_spec(request.getfixturevalue("sd_folder"), request.getfixturevalue("lora_folder"))
        return entry, lambda d: d.conditions(0, range(4))
    if kind in ("sd", "sdxl", "sd3", "audioldm"):  # text models: their prompts; audioldm decodes through its vocoder
        folder, spec = {"sd": ("sd_folder", sd_spec), "sdxl": ("sdxl_folder", sdxl_spec),
                        "sd3": ("sd3_folder", sd3_spec), "audioldm": ("audio_folder", audio_spec)}[kind]
        return spec(request.getfixturevalue(folder)), lambda d: d.conditions(0, range(4))
    entry = dit_spec(request.getfixturevalue("dit_folder"))
    return entry, lambda d: torch.tensor([1, 2, 3, 4], device=d.info.device)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "dit", "audioldm", "lcm", "lcm-lora"])
def test_fp16_on_cuda_agrees_with_fp32_on_cpu(kind, request):
    entry, cond_of = entry_and_conditions(kind, request)
    scale = 1.0 if kind == "lcm" else 3.0
    reference = guided_samples(entry, "cpu", "float32", cond_of, scale)
    half = guided_samples(entry, "cuda", "float16", cond_of, scale)
    assert torch.isfinite(half).all()
    assert float((half - reference).norm() / reference.norm()) <= FP16_RTOL


@pytest.mark.parametrize("kind", ["sd", "dit", "lcm-lora"])
def test_compiled_network_on_cuda_agrees_with_eager_and_compiles_once(kind, request):
    from torch._dynamo.utils import counters

    entry, cond_of = entry_and_conditions(kind, request)
    compiled = {**entry, "params": {**entry.get("params", {}), "compile": True}}
    forget_compiled()
    torch._dynamo.reset()
    eager = guided_samples(entry, "cuda", "float16", cond_of)
    start = counters["stats"]["unique_graphs"]
    first = guided_samples(compiled, "cuda", "float16", cond_of)
    graphs = counters["stats"]["unique_graphs"] - start
    again = guided_samples(compiled, "cuda", "float16", cond_of)  # a second cell of this process
    forget_compiled()
    assert graphs >= 1 and counters["stats"]["unique_graphs"] - start == graphs
    assert torch.isfinite(first).all() and torch.equal(first, again)
    assert float((first - eager).norm() / eager.norm()) <= FP16_RTOL
