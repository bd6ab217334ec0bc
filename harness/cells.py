"""One grid cell: (model, method, NFE, seed, S samples) -> samples.npz + cell.json."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness import prepared
from harness.config import config_hash
from harness.methods import make_sampler
from harness.models import load_denoiser, resolve_device
from harness.models.base import Denoiser
from harness.nfe import CountingDenoiser
from harness.noise import NOISE_VERSION, SampleNoise
from harness.provenance import environment


@dataclass
class Generated:
    samples: np.ndarray  # float32 [S, ...] in data space
    noise: np.ndarray  # float32 [S, ...] the standard normal draws the sampler started from
    nfe_measured: float
    wall_s: float
    status: str  # ok | diverged
    latents: np.ndarray | None = None  # latent models: float32 [S, ...] before decode (mse_ref's space)


def generate(denoiser: Denoiser, sampler, nfe: int, seed: int, num_samples: int, batch_size: int) -> Generated:
    """Run a sampler over samples 0..S-1 in batches; sample i depends only on (seed, i)."""
    counted = CountingDenoiser(denoiser)
    info = denoiser.info
    outs, noises, latents = [], [], []
    wall = 0.0
    for start in range(0, num_samples, batch_size):
        gen = SampleNoise(seed, range(start, min(start + batch_size, num_samples)), device=info.device)
        noise = gen.randn(info.data_shape, dtype=info.dtype)
        _sync(info.device)
        t0 = time.perf_counter()
        z0 = sampler.sample(counted, noise, nfe, None, gen)
        x0 = denoiser.decode(z0)
        _sync(info.device)
        wall += time.perf_counter() - t0
        outs.append(x0.float().cpu().numpy())
        if info.latent:
            latents.append(z0.float().cpu().numpy())
        noises.append(noise.float().cpu().numpy())
    samples = np.concatenate(outs)
    status = "ok" if np.isfinite(samples).all() else "diverged"
    return Generated(samples, np.concatenate(noises), counted.nfe_per_sample(num_samples), wall, status,
                     np.concatenate(latents) if info.latent else None)


def _plain_number(value: float) -> int | float:
    """6 rather than 6.0 for a whole count (a mean over samples can be fractional, e.g. adaptive steps)."""
    return int(value) if float(value).is_integer() else value


def cell_config_hash(model_spec: dict, method_spec: dict, nfe: int, seed: int, num_samples: int) -> str:
    """What a cell's samples depend on, hashed: cell.json's config_hash, and a param of the cell's Snakemake
    job (harness.workflow), so that an edited entry, or a new definition of the noise, reruns it."""
    return config_hash(model_spec, method_spec, nfe, seed, num_samples, NOISE_VERSION)


def run_cell(
    model_id: str,
    model_spec: dict,
    method_id: str,
    method_spec: dict,
    nfe: int,
    out_dir: Path,
    num_samples: int,
    seed: int = 0,
    batch_size: int | None = None,
    keep_noise: bool = False,
    device: str | None = None,
    cache_dir: Path | None = None,
) -> dict:
    device = resolve_device(device)
    sampler = make_sampler(method_spec)
    sampler.check_nfe(nfe)  # fail before loading a model
    prepared_record = prepared.load(sampler, cache_dir, model_id, model_spec, method_id, method_spec, nfe)
    denoiser = load_denoiser(model_spec, device)
    batch_size = min(batch_size or model_spec.get("batch_size", 250), num_samples)  # the batch that runs
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    result = generate(denoiser, sampler, nfe, seed, num_samples, batch_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    # metrics of samples this run replaces would otherwise be reported as this cell's
    (out_dir / "metrics.json").unlink(missing_ok=True)
    arrays = {"samples": result.samples}
    if keep_noise:
        arrays["noise"] = result.noise
    if result.latents is not None:
        arrays["latents"] = result.latents
    np.savez(out_dir / "samples.npz", **arrays)
    peak_mb, peak_kind = _peak_memory_mb(device)
    cell = {
        "model": model_id,
        "method": method_id,
        "family": method_spec["family"],
        "nfe": nfe,
        "nfe_measured": _plain_number(result.nfe_measured),
        "network_evals": _plain_number(result.nfe_measured),  # no guidance yet: one network row per D call
        "num_samples": num_samples,
        "seed": seed,
        "batch_size": batch_size,
        "wall_s": result.wall_s,
        "peak_mem_mb": peak_mb,
        "status": result.status,
        "prepared": prepared_record,  # side data made in its own job, and what it cost
        "provenance": {
            "config_hash": cell_config_hash(model_spec, method_spec, nfe, seed, num_samples),
            "model_spec": model_spec,
            "method_spec": method_spec,
            "process": denoiser.process.describe(),
            "peak_mem_kind": peak_kind,
            **environment(device),
        },
    }
    (out_dir / "cell.json").write_text(json.dumps(cell, indent=2, default=str))
    return cell


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device) -> tuple[float, str]:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    # CPU: the process's peak resident set (Linux reports KiB), imports and model included.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"
