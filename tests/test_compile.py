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


def test_network_batch_auto_is_the_largest_chunk_that_fits(pipeline_folder, monkeypatch):
    """params.network_batch: auto halves the first call's rows while the device runs out of memory (simulated
    here: the UNet refuses calls of more than 5 rows), keeps that chunk, and gives the samples of a fixed one."""
    auto = load_denoiser(spec(pipeline_folder, params={"network_batch": "auto"}))
    fixed = load_denoiser(spec(pipeline_folder, params={"network_batch": 4}))
    assert auto.chunk is None
    net, calls = auto.net, []

    def small_device(x_t, t, cond):
        calls.append(len(x_t))
        if len(x_t) > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return net(x_t, t, cond)

    monkeypatch.setattr(auto, "net", small_device)
    x = torch.randn(16, *auto.info.data_shape, generator=torch.Generator().manual_seed(0))
    labels = auto.conditions(0, range(16))
    got = auto(x, 2.0, labels)
    assert auto.chunk == 4 and calls == [16, 8, 4, 4, 4, 4]  # 16 and 8 rows failed; 4 chunks of 4 ran
    torch.testing.assert_close(got, fixed(x, 2.0, labels), rtol=0, atol=0)
    auto(x[:7], 2.0, None if labels is None else labels[:7])
    assert calls[6:] == [4, 4]  # kept: later calls are not probed again
    with pytest.raises(ConfigError, match=r"network_batch: rows per network call, an integer >= 1 or 'auto'; not 0$"):
        check_model(spec(pipeline_folder, params={"network_batch": 0}))
