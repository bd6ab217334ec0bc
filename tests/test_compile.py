"""params.compile: the network torch.compile'd once per process (harness.models.compiled), on a tiny diffusers_unet
checkpoint on the CPU. Compiled cells give the eager cells' samples (float32, inductor's fused kernels: last bits
only), and a second cell in the same process, as a warm worker would run it, compiles nothing new."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from test_diffusers_unet import pipeline_folder, spec  # noqa: E402,F401  (fixture)

from harness.cells import run_cell  # noqa: E402
from harness.config import load_methods  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402
from harness.models.compiled import forget_compiled  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
RTOL = 1e-5


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def samples(folder) -> np.ndarray:
    with np.load(folder / "samples.npz") as data:
        return data["samples"]


def test_compiled_cells_match_eager_and_compile_once_per_process(pipeline_folder, tmp_path):
    forget_compiled()
    torch._dynamo.reset()
    method = load_methods("methods.yaml")["dpmpp_2m"]
    common = dict(num_samples=3, batch_size=3, cache_dir=tmp_path / "cache")
    eager = spec(pipeline_folder)
    compiled = spec(pipeline_folder, params={"compile": True})
    start = compiled_graphs()
    for seed in (0, 1):
        run_cell("tiny", eager, "dpmpp_2m", method, 4, tmp_path / f"eager{seed}", seed=seed, **common)
    assert compiled_graphs() == start  # eager cells compile nothing
    run_cell("tiny", compiled, "dpmpp_2m", method, 4, tmp_path / "compiled0", seed=0, **common)
    first = compiled_graphs() - start
    assert first >= 1
    # a second cell in this process (another seed, as a warm worker serves it): the same compiled network
    assert load_denoiser(compiled).module is load_denoiser(compiled).module
    run_cell("tiny", compiled, "dpmpp_2m", method, 4, tmp_path / "compiled1", seed=1, **common)
    assert compiled_graphs() - start == first
    for seed in (0, 1):
        got, want = samples(tmp_path / f"compiled{seed}"), samples(tmp_path / f"eager{seed}")
        assert np.linalg.norm(got - want) <= RTOL * np.linalg.norm(want)
    forget_compiled()


def test_compile_settings_are_checked_at_planning(pipeline_folder):
    check_model(spec(pipeline_folder, params={"compile": "max-autotune-no-cudagraphs"}))
    with pytest.raises(ConfigError, match="params.compile is true, false or one of .*CUDA-graph modes"):
        check_model(spec(pipeline_folder, params={"compile": "reduce-overhead"}))
    with pytest.raises(ConfigError, match="params.compile is true, false or one of"):
        check_model(spec(pipeline_folder, params={"compile": "yes"}))
