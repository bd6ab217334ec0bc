"""One grid cell: (model, method, NFE, seed, S samples) -> samples.npz + cell.json."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness import prepared
from harness.cellstore import MemoryStore, PartialCell
from harness.config import config_hash
from harness.errors import ConfigError, StepbenchError
from harness.files import sha256_file, write_json
from harness.guidance import check_interval, guided
from harness.memory import PeakMemory
from harness.methods import make_sampler
from harness.models import guidance_refusal, load_denoiser, resolve_device
from harness.models.base import Denoiser
from harness.progress import batch_progress
from harness.nfe import CountingDenoiser
from harness.noise import NOISE_VERSION, SampleNoise
from harness.provenance import environment
from harness.threads import threads_for_work, use_threads


@dataclass
class Generated:
    samples: np.ndarray  # float32 [S, ...] in data space (a memory map when the cell streams to disk)
    noise: np.ndarray | None  # float32 [S, ...] the standard normal draws the sampler started from, if kept
    nfe_measured: float
    wall_s: float
    network_s: float  # of wall_s, inside denoiser calls
    status: str  # ok | diverged
    latents: np.ndarray | None = None  # latent models: float32 [S, ...] before decode (mse_ref's space)
    conditions: dict[str, np.ndarray] | None = None  # what samples.npz keeps of the conditions (labels: int64 [S])
    evals_by_model: dict[str, float] | None = None  # network passes per sample of each model (MAIN: the cell's)


MAIN = "__cell_model__"  # the cell's own model among the networks a cell evaluates


def generate(denoiser: Denoiser, sampler, nfe: int, seed: int, num_samples: int, batch_size: int,
             store: MemoryStore | PartialCell | None = None, keep_noise: bool = False,
             networks: dict[str, CountingDenoiser] | None = None) -> Generated:
    """Run a sampler over samples 0..S-1 in batches; sample i depends only on (seed, i). Batches go to `store`
    (memory by default); batches it already holds (a resumed cell) are skipped.

    `denoiser` is what the sampler calls (perhaps guided); `networks` the counters on the networks inside it,
    by model (MAIN: the cell's; a stitched small model), which count network passes where the sampler's calls
    are counted as NFE. Without them the denoiser is its own network."""
    if networks is None:
        denoiser = CountingDenoiser(denoiser)
        networks = {MAIN: denoiser}
    store = store if store is not None else MemoryStore()
    info = denoiser.info
    done = store.finished()
    starts = [start for start in range(0, num_samples, batch_size) if start not in done]
    progress = batch_progress(len(starts), "sampling")  # each batch: sampling and decoding
    for start in starts:
        counted = CountingDenoiser(sampler.denoiser_for(denoiser))  # the audited NFE: the sampler's denoiser calls
        before = {m: (c.network_rows, c.network_s) for m, c in networks.items()}
        rows = range(start, min(start + batch_size, num_samples))
        gen = SampleNoise(seed, rows, device=info.device)
        noise = gen.randn(info.data_shape, dtype=info.dtype)
        cond = denoiser.conditions(seed, rows)  # class labels, prompts: from (seed, i) as the noise is
        _sync(info.device)
        t0 = time.perf_counter()
        z0 = sampler.sample(counted, noise, nfe, cond, gen)
        x0 = denoiser.decode(z0)
        _sync(info.device)
        wall = time.perf_counter() - t0
        arrays = {"samples": x0.float().cpu().numpy()}
        if info.latent:
            arrays["latents"] = z0.float().cpu().numpy()
        if keep_noise:
            arrays["noise"] = noise.float().cpu().numpy()
        record = {"wall_s": wall, "rows": counted.rows,
                  "network_rows": {m: c.network_rows - before[m][0] for m, c in networks.items()},
                  "network_s": sum(c.network_s - before[m][1] for m, c in networks.items()),
                  "finite": bool(np.isfinite(arrays["samples"]).all())}
        store.add(start, arrays, record)
        progress.update(1)
    progress.close()
    records = store.finished().values()
    status = "ok" if all(r["finite"] for r in records) else "diverged"
    conditions = denoiser.condition_record(seed, num_samples)
    evals: dict[str, float] = {}
    for record in records:
        for model, network_rows in record["network_rows"].items():
            evals[model] = evals.get(model, 0) + network_rows / num_samples
    return Generated(store.array("samples"), store.array("noise"), sum(r["rows"] for r in records) / num_samples,
                     sum(r["wall_s"] for r in records), sum(r["network_s"] for r in records), status,
                     store.array("latents"), conditions, evals)


def _plain_number(value: float) -> int | float:
    """6 rather than 6.0 for a whole count (a mean over samples can be fractional, e.g. adaptive steps)."""
    return int(value) if float(value).is_integer() else value


def cell_config_hash(model_spec: dict, method_spec: dict, nfe: int, seed: int, num_samples: int,
                     guidance: float = 1.0) -> str:
    """What a cell's samples depend on, hashed: cell.json's config_hash, and a param of the cell's Snakemake
    job (harness.workflow), so that an edited entry, or a new definition of the noise, reruns it. (Unguided
    cells hash as they did before guidance was a grid axis.)"""
    scale = () if guidance == 1 else (float(guidance),)
    return config_hash(model_spec, method_spec, nfe, seed, num_samples, NOISE_VERSION, *scale)


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
    models: dict | None = None,
    guidance: float = 1.0,
) -> dict:
    """`models`: the models file's entries, for a method that runs other models beside this one (stitch)."""
    device = resolve_device(device)
    sampler = make_sampler(method_spec)
    sampler.check_nfe(nfe)  # fail before loading a model
    sampler.check_model(nfe, model_spec)
    if guidance != 1 and (refusal := guidance_refusal(model_spec)):
        raise ConfigError(f"{model_id}: guidance {guidance:g}: {refusal}")
    prepared_record = prepared.load(sampler, cache_dir, model_id, model_spec, method_id, method_spec, nfe)
    batch_size = min(batch_size or model_spec.get("batch_size", 250), num_samples)  # the batch that runs
    config = cell_config_hash(model_spec, method_spec, nfe, seed, num_samples, guidance)
    # finished batches survive a kill; a partial cell of other settings is discarded
    store = PartialCell(out_dir, {"config_hash": config, "batch_size": batch_size, "keep_noise": keep_noise},
                        num_samples)
    interval = check_interval(method_spec.get("guidance_interval"), f"{method_id}.guidance_interval")
    with PeakMemory(device) as peak:
        # a counter on every network the cell runs (the cell's, a stitched small one), each under the same guidance
        model = load_denoiser(model_spec, device, cache_dir, model_id)
        # FLOPs of the network as loaded: a quantised copy performs the same operations (at its precision)
        flops = {MAIN: flops_of_model(cache_dir, model_id, model_spec, batch_size, model)}
        threads = choose_threads(model, flops[MAIN]["flops_per_call"])
        with use_threads(threads):  # a compiled network is specialised to the thread count it first runs with
            networks = {MAIN: CountingDenoiser(sampler.model_for(model))}
        for other in sampler.extra_models():
            if models is None or other not in models:
                raise StepbenchError(f"method {method_id!r} runs model {other!r}, which is not in the models file")
            networks[other] = CountingDenoiser(load_denoiser(models[other], device, cache_dir, other))
            flops[other] = flops_of_model(cache_dir, other, models[other], batch_size, networks[other])
        sampler.use_models({m: guided(net, guidance, interval) for m, net in networks.items() if m != MAIN})
        denoiser = guided(networks[MAIN], guidance, interval)
        with use_threads(threads):
            result = generate(denoiser, sampler, nfe, seed, num_samples, batch_size, store, keep_noise, networks)

    # metrics of samples this run replaces would otherwise be reported as this cell's
    (out_dir / "metrics.json").unlink(missing_ok=True)
    store.write_npz(out_dir / "samples.npz", ["samples", "noise", "latents"], result.conditions)
    cell = {
        "model": model_id,
        "method": method_id,
        "family": method_spec["family"],
        "nfe": nfe,
        "nfe_measured": _plain_number(result.nfe_measured),
        "guidance": guidance,
        # network passes per sample: a guided evaluation is one denoiser call (the NFE) and two passes
        "network_evals": _plain_number(sum(result.evals_by_model.values())),
        "num_samples": num_samples,
        "seed": seed,
        "batch_size": batch_size,
        "wall_s": result.wall_s,
        "network_s": result.network_s,  # of wall_s, the time inside denoiser calls
        # each network's passes x its measured FLOPs per row
        "gflops_per_sample": sum(n * flops[m]["flops_per_row"] for m, n in result.evals_by_model.items()) / 1e9,
        "evals_by_model": {model_id if m == MAIN else m: _plain_number(n) for m, n in result.evals_by_model.items()},
        "threads": threads,
        "peak_mem_mb": peak.mb,
        "status": result.status,
        "samples_sha256": sha256_file(out_dir / "samples.npz"),  # what evaluate and the report check it against
        "prepared": prepared_record,  # side data made in its own job, and what it cost
        "method_record": sampler.record(),  # what the method records of its own work (a quantised network)
        "provenance": {
            "config_hash": config,
            "model_spec": model_spec,
            "method_spec": method_spec,
            "process": denoiser.process.describe(),
            "peak_mem_kind": peak.kind,
            **environment(device),
        },
    }
    write_json(out_dir / "cell.json", cell)  # last: a cell.json means a complete cell
    store.discard()
    return cell


def flops_of_model(cache_dir, model_id: str, model_spec: dict, batch_size: int, denoiser) -> dict:
    """The model's measured FLOPs per call at this batch size (harness.flops), from the cache the workflow's
    flops job fills, or measured here (and cached, given a cache)."""
    from harness import flops

    if cache_dir is None:
        return flops.measure(denoiser, batch_size)
    return flops.load_or_measure(cache_dir, model_id, model_spec, batch_size, denoiser)


def choose_threads(denoiser: Denoiser, flops_per_call: float) -> int | None:
    """CPU threads for this cell's work (harness.threads), from the FLOPs of one denoiser call at the batch
    size. None on a GPU, where the CPU only launches kernels."""
    if torch.device(denoiser.info.device).type != "cpu":
        return None
    return threads_for_work(flops_per_call)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
