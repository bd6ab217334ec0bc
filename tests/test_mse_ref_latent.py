"""mse_ref of latent models is measured in the latent space the solver works in.

A tiny latent model: gmm2d's exact denoiser on a 2-D "latent" with a fixed linear decoder to 3-D
data. Its latents are exactly gmm2d's samples, so its latent-space mse_ref must equal gmm2d's own
mse_ref, while the decoded samples (what FID would see) differ from them.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from harness import references
from harness.cells import run_cell
from harness.config import load_methods, load_models
from harness.evaluate import evaluate_cell
from harness.models import MODELS
from harness.models.analytic import GaussianMixture

from conftest import REPO

DECODER = np.array([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]])  # latent 2-D -> data 3-D, full column rank
ADAPTER = "test_latent_gmm2d"


class LatentGaussianMixture(GaussianMixture):
    @classmethod
    def from_config(cls, spec, device):
        model = super().from_config(spec, device)
        model.info = dataclasses.replace(model.info, latent=True)
        return model

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0 @ torch.as_tensor(DECODER.T, dtype=x0.dtype, device=x0.device)


@pytest.fixture
def zoo(monkeypatch):
    models, methods = load_models(REPO / "models.yaml"), load_methods(REPO / "methods.yaml")
    monkeypatch.setitem(MODELS._entries, ADAPTER, LatentGaussianMixture)  # gone after the test
    latent = {**models["gmm2d"], "adapter": ADAPTER}
    return models["gmm2d"], latent, methods


def _cell(tmp_path, model_id, spec, methods, name):
    out = tmp_path / name
    run_cell(model_id, spec, "dpmpp_2m", methods["dpmpp_2m"], 8, out, 48, seed=5, batch_size=16, device="cpu",
             cache_dir=tmp_path / "cache")
    return out


def test_latent_model_stores_latents_and_mse_ref_compares_them(tmp_path, zoo):
    pixel_spec, latent_spec, methods = zoo
    pixel_dir = _cell(tmp_path, "gmm2d", pixel_spec, methods, "pixel")
    latent_dir = _cell(tmp_path, "latent-gmm2d", latent_spec, methods, "latent")

    with np.load(pixel_dir / "samples.npz") as pixel, np.load(latent_dir / "samples.npz") as latent:
        assert pixel.files == ["samples"]  # pixel models: unchanged contract
        assert latent["latents"].tobytes() == pixel["samples"].tobytes()  # same noise, same solver
        assert latent["samples"].shape == (48, 3)
        expected = latent["latents"].astype(np.float64) @ DECODER.T
        np.testing.assert_allclose(latent["samples"], expected, rtol=1e-6, atol=1e-6)
        latents, decoded = latent["latents"], latent["samples"]

    cache = tmp_path / "cache"
    pixel_out = evaluate_cell(pixel_dir, pixel_spec, methods, ["mse_ref"], cache)
    latent_out = evaluate_cell(latent_dir, latent_spec, methods, ["mse_ref"], cache)
    assert pixel_out["provenance"]["mse_ref"]["space"] == "data"
    assert latent_out["provenance"]["mse_ref"]["space"] == "latent"
    assert latent_out["mse_ref"] > 0
    assert latent_out["mse_ref"] == pytest.approx(pixel_out["mse_ref"], rel=1e-12)

    # the reference solution stores its latents too, and they are the decoded reference's preimage
    ref_path = references.reference_path(cache, "latent-gmm2d", latent_spec, "solver", 5, 48, methods)
    with np.load(ref_path) as ref:
        ref_latents, ref_samples = ref["latents"], ref["samples"]
        assert json.loads(str(ref["recipe"]))["nfe"] == latent_spec["reference"]["nfe"]
    np.testing.assert_allclose(ref_samples, ref_latents.astype(np.float64) @ DECODER.T, rtol=1e-6, atol=1e-6)
    data_space = float(((decoded.astype(np.float64) - ref_samples) ** 2).mean())
    assert latent_out["mse_ref"] != pytest.approx(data_space, rel=1e-3)  # the decoder would have changed it


def test_latent_reference_from_before_latents_were_stored_is_recomputed(tmp_path, zoo):
    _, latent_spec, methods = zoo
    cache = tmp_path / "cache"
    args = (cache, "latent-gmm2d", latent_spec, "solver", 0, 8, methods)
    path = references.reference_path(*args)
    path.parent.mkdir(parents=True)
    np.savez(path, samples=np.zeros((8, 3), np.float32), recipe="{}")  # an older file: decoded samples only
    latents = references.load_or_compute(*args, array="latents")
    assert latents.shape == (8, 2) and np.isfinite(latents).all() and np.abs(latents).sum() > 0
