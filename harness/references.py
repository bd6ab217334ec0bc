"""Cached reference solutions from the same noise as a cell.

- "exact": for analytic models, the PF-ODE solved by scipy's DOP853 (rtol 1e-10) in u = log sigma~,
  dx~/du = x~ - D(x~, e^u), from sigma_max to sigma_min, then the same final denoising step every
  solver takes to sigma = 0. That makes the exact target the limit of every consistent solver.
- "solver": a high-NFE run of the model's configured reference method (models.yaml `reference`).

Both are keyed by (model spec, seed, number of samples, kind and solver) and stored under the cache
directory, so the Snakemake reference rule and a standalone `stepbench evaluate` share one file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from harness.config import config_hash, lookup
from harness.errors import ConfigError, StepbenchError, valid_names
from harness.files import save_npz
from harness.models import load_denoiser
from harness.nfe import CountingDenoiser
from harness.noise import NOISE_VERSION, SampleNoise

EXACT_RTOL = 1e-10
EXACT_ATOL = 1e-10
KINDS = ("exact", "solver")


def reference_key(model_id: str, model_spec: dict, kind: str, seed: int, num_samples: int, methods: dict) -> str:
    solver = _reference_method(model_id, model_spec, methods) if kind == "solver" else {"dop853_rtol": EXACT_RTOL}
    return config_hash(model_spec, kind, seed, num_samples, solver, NOISE_VERSION)  # from that noise


def reference_path(cache_dir: Path, model_id: str, model_spec: dict, kind: str, seed: int, num_samples: int,
                   methods: dict) -> Path:
    key = reference_key(model_id, model_spec, kind, seed, num_samples, methods)
    return Path(cache_dir) / "references" / model_id / f"{kind}-{key}.npz"


def load_or_compute(cache_dir, model_id, model_spec, kind, seed, num_samples, methods, device="cpu",
                    array: str = "samples") -> np.ndarray:
    """The reference's decoded `samples`, or (latent models, kind solver) its pre-decode `latents`."""
    path = reference_path(cache_dir, model_id, model_spec, kind, seed, num_samples, methods)
    if not path.exists() or not _holds(path, array):  # a file from before latents were stored: recompute
        compute(path, model_id, model_spec, kind, seed, num_samples, methods, device, cache_dir)
    with np.load(path, allow_pickle=False) as data:
        if array not in data.files:
            raise StepbenchError(f"{path}: reference has no {array!r} (only latent models' solver references do)")
        return data[array]


def open_reference(cache_dir, model_id, model_spec, kind, seed, num_samples, methods, device="cpu",
                   array: str = "samples"):
    """The reference as an NpzArray, read in blocks by the metrics (computed first if missing)."""
    from harness.cellstore import NpzArray

    path = reference_path(cache_dir, model_id, model_spec, kind, seed, num_samples, methods)
    if not path.exists() or not _holds(path, array):
        compute(path, model_id, model_spec, kind, seed, num_samples, methods, device, cache_dir)
    if not _holds(path, array):
        raise StepbenchError(f"{path}: reference has no {array!r} (only latent models' solver references do)")
    return NpzArray(path, array)


def _holds(path: Path, array: str) -> bool:
    with np.load(path, allow_pickle=False) as data:
        return array in data.files


def compute(path: Path, model_id, model_spec, kind, seed, num_samples, methods, device="cpu",
            cache_dir=None) -> None:
    # times the network calls (accounting)
    denoiser = CountingDenoiser(load_denoiser(model_spec, device, cache_dir, model_id))
    if kind == "exact":
        if not denoiser.info.extra.get("analytic"):
            raise StepbenchError(f"exact_err needs an analytic model; {model_id!r} is not (use mse_ref)")
        samples, recipe = exact_solution(denoiser, seed, num_samples), {"solver": "scipy DOP853", "rtol": EXACT_RTOL}
        save_npz(path, samples=samples.astype(np.float32), recipe=json.dumps(recipe))
    elif kind == "solver":
        from harness.cellstore import PartialCell
        from harness.cells import generate
        from harness.methods import make_sampler

        spec = _reference_method(model_id, model_spec, methods)
        nfe = model_spec["reference"]["nfe"]
        batch = min(model_spec.get("batch_size", 250), num_samples)
        # batches on disk as they finish, as a cell's: a long reference resumes after a kill, memory stays flat
        store = PartialCell(path.parent, {"reference": path.name, "batch_size": batch}, num_samples,
                            folder=f".{path.stem}.partial")
        generate(denoiser, make_sampler(spec), nfe, seed, num_samples, batch, store)
        recipe = {"method": model_spec["reference"]["method"], "nfe": nfe, "spec": spec}
        store.write_npz(path, ["samples", "latents"], {"recipe": json.dumps(recipe)})  # latents: latent models
        store.discard()
    else:
        raise ValueError(f"reference kind {kind!r}; valid: {KINDS}")


def _reference_method(model_id: str, model_spec: dict, methods: dict) -> dict:
    """The method spec of the model's `reference` entry, from the methods file."""
    ref = model_spec.get("reference")
    if ref is None:
        raise ConfigError(f"model {model_id!r}: mse_ref needs a 'reference: {{method, nfe}}' entry in its models file")
    methods_file = getattr(methods, "path", "the methods file")
    if ref["method"] not in methods:
        raise ConfigError(f"model {model_id!r}: key 'reference.method': {ref['method']!r} is not in {methods_file}"
                          f"{valid_names(ref['method'], methods)}")
    return lookup(methods, ref["method"], methods_file, "method")


def exact_solution(denoiser, seed: int, num_samples: int, chunk: int = 500, closed_form: bool = True) -> np.ndarray:
    from scipy.integrate import solve_ivp

    process, info = denoiser.process, denoiser.info
    s_max, s_min = process.sigma_max, process.sigma_min
    out = []
    for start in range(0, num_samples, chunk):
        gen = SampleNoise(seed, range(start, min(start + chunk, num_samples)))
        x0 = gen.randn(info.data_shape, dtype=torch.float64) * process.prior_std(s_max)
        shape = x0.shape
        if denoiser.exact_flow is not None and closed_form:  # a model whose PF-ODE has one (GaussianData)
            out.append(denoiser(denoiser.exact_flow(x0, s_max, s_min), s_min).numpy())
            continue

        def rhs(u, y):
            x = torch.from_numpy(y).reshape(shape)
            return (x - denoiser(x, math.exp(u))).reshape(-1).numpy()

        sol = solve_ivp(rhs, (math.log(s_max), math.log(s_min)), x0.reshape(-1).numpy(), method="DOP853",
                        rtol=EXACT_RTOL, atol=EXACT_ATOL)
        if not sol.success:
            raise StepbenchError(f"exact PF-ODE solve failed: {sol.message}")
        x_min = torch.from_numpy(sol.y[:, -1]).reshape(shape)
        out.append(denoiser(x_min, s_min).numpy())
    return np.concatenate(out)
