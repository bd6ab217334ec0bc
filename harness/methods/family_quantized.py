"""family: quantized — post-training quantisation of the model's network (harness.quantization), then any solver
of the zoo on it, unchanged: the NFE audit, the paired noise and the schedule are the base solver's.

    dpmpp_2m_w8a8:
      family: quantized
      quantized: {base: dpmpp_2m, scheme: w8a8, calibration: {timesteps: uniform, samples: 256}}
    dpmpp_2m_w4a8_sim:
      family: quantized
      quantized: {base: dpmpp_2m, scheme: w4a8, simulate: true, calibration: {timesteps: uniform, samples: 256}}

Schemes: `w8a8` (PT2E static int8, oneDNN kernels on x86), `w8` (torchao int8 weight-only, no calibration), any
`wNaM` with `simulate: true` (fake-quant, fp32 kernels: quality only, no speed claim). First and last layer:
at W8A8 every layer is 8 bit and the output stays fp32, as both papers; a simulated W4 keeps the layer reading
x_t and the one writing the output at 8-bit weights (PTQ4DM's set_first_last_layer_to_8bit).

Calibration is a prepared artifact (scope "model": one per model and entry, shared by every NFE). Its inputs
are the full-precision network's own inputs on `trajectories` DDIM runs (Euler on the PF-ODE, `trajectory_steps`
steps uniform in the training time) from calibration noise (harness.prepared.CALIBRATION_SEED, disjoint from
every cell's), recorded as the network saw them. `samples` calibration inputs (x_t, t, label) are drawn: input i
comes from trajectory i mod `trajectories`, at the recorded step nearest the time step the chooser gives it
(`uniform`: Q-Diffusion's evenly spaced steps; `ptq4dm_normal`: PTQ4DM's t ~ N(0.4T, 0.4T), clipped). So
uniform and ptq4dm_normal see the same trajectories and the same number of inputs; only the time steps differ.

In a cell the network is rebuilt from the artifact without calibrating, compiled, and run once on a dummy batch
before sampling, so the cell's wall time holds no compilation; the compiled network is kept per worker process
by (weights, scheme, artifact), so the cells of one scheme share one compilation. gflops_per_sample stays the
fp32 network's count: the quantised network performs the same multiply-adds, at the precision its record gives.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch

from harness.errors import ConfigError, UnsupportedNFE, valid_names
from harness.methods.base import Sampler
from harness.models.base import Denoiser, NetworkDenoiser

CALIBRATION_KEYS = {"timesteps": "uniform", "samples": 256, "trajectories": 32, "trajectory_steps": 50}
SETTINGS_KEYS = ("base", "scheme", "simulate", "calibration", "fp32_modules", "compile")
GRAPH_ROWS = 32  # calibration inputs per observer pass (inside PT2E's exported batch range)

_BUILT: dict[tuple, object] = {}  # per process: (weights, scheme, artifact, device, batch) -> compiled QuantizedNet


def network_of(denoiser: Denoiser) -> NetworkDenoiser:
    """The network denoiser under the wrappers (counting, calibration labels) of a loaded model."""
    inner = denoiser
    while not isinstance(inner, NetworkDenoiser):
        if not hasattr(inner, "inner"):
            raise ConfigError(f"family quantized needs a network model; {type(inner).__name__} has no network")
        inner = inner.inner
    if inner.module is None:
        raise ConfigError(f"family quantized: {type(inner).__name__} exposes no torch module to quantise")
    return inner


class QuantizedSampler(Sampler):
    family = "quantized"
    cell_metrics = ("mse_fp32", "model_bytes", "int8_kernels")

    def __init__(self, spec: dict):
        super().__init__(spec)
        from harness.methods import make_sampler
        from harness.quantization import SCHEMES
        from harness.quantization.simulate import parse_bits

        settings = spec.get("quantized")
        if not isinstance(settings, dict) or "scheme" not in settings:
            raise ConfigError("family quantized needs 'quantized: {base, scheme[, simulate, calibration]}'")
        unknown = sorted(set(settings) - set(SETTINGS_KEYS))
        if unknown:
            raise ConfigError(f"quantized.{unknown[0]}: unknown{valid_names(unknown[0], SETTINGS_KEYS)}")
        if "base_spec" not in spec:
            raise ConfigError("quantized.base must name a solver entry of the methods file")
        self.scheme, self.simulate = settings["scheme"], settings.get("simulate", False)
        if not isinstance(self.simulate, bool):
            raise ConfigError(f"quantized.simulate must be true or false, not {self.simulate!r}")
        if self.simulate:
            _, a_bits = parse_bits(self.scheme)
            needs_calibration = a_bits is not None
        elif self.scheme not in SCHEMES:
            hint = "; it has no fast kernel here: set simulate: true" if str(self.scheme).startswith("w") else ""
            raise ConfigError(f"quantized.scheme {self.scheme!r} unknown{hint}; valid: {', '.join(SCHEMES)} "
                              f"(or any wNaM with simulate: true)")
        else:
            needs_calibration = self.scheme == "w8a8"
        self.calibration = self._calibration(settings.get("calibration"), needs_calibration)
        self.fp32_modules = tuple(settings.get("fp32_modules", ()))
        # compile: false runs the eager graphs (fp32 kernels on int8-rounded tensors): for tests, never timings
        self.compile = settings.get("compile", True)
        if not isinstance(self.compile, bool):
            raise ConfigError(f"quantized.compile must be true or false, not {self.compile!r}")
        self.base_id = settings["base"]
        self.base = make_sampler(spec["base_spec"])
        if self.base.prepare_scope is not None:
            raise ConfigError(f"quantized.base {self.base_id!r} has prepared side data; quantise a solver without")
        self.prepare_scope = "model" if needs_calibration else None
        self.artifact: dict | None = None
        self._record: dict = {}

    def _calibration(self, given, needed: bool) -> dict | None:
        from harness.quantization import TIMESTEP_KINDS

        if not needed:
            if given is not None:
                raise ConfigError(f"quantized.calibration: scheme {self.scheme} calibrates nothing (weight-only or "
                                  f"dynamic); remove it")
            return None
        if given is None:
            raise ConfigError(f"quantized.calibration: scheme {self.scheme} needs calibration "
                              f"{{timesteps: uniform | ptq4dm_normal, samples: N}}")
        if not isinstance(given, dict):
            raise ConfigError(f"quantized.calibration must be a mapping, not {given!r}")
        unknown = sorted(set(given) - set(CALIBRATION_KEYS))
        if unknown:
            raise ConfigError(f"quantized.calibration.{unknown[0]}: unknown{valid_names(unknown[0], CALIBRATION_KEYS)}")
        calibration = {**CALIBRATION_KEYS, **given}
        if calibration["timesteps"] not in TIMESTEP_KINDS:
            raise ConfigError(f"quantized.calibration.timesteps {calibration['timesteps']!r} unknown"
                              f"{valid_names(calibration['timesteps'], TIMESTEP_KINDS)}")
        for key in ("samples", "trajectories", "trajectory_steps"):
            value = calibration[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ConfigError(f"quantized.calibration.{key} must be an integer >= 2, not {value!r}")
        return calibration

    def summary(self) -> dict[str, str]:
        cal = self.calibration
        params = f"base={self.base_id}, scheme={self.scheme}" + (" (simulated)" if self.simulate else "")
        if cal:
            params += f", calibration={cal['timesteps']} x{cal['samples']}"
        return {**self.base.summary(), "family": self.family, "side data": "per model" if cal else "-",
                "params": params}

    def check_nfe(self, nfe: int) -> None:
        try:
            self.base.check_nfe(nfe)
        except UnsupportedNFE as err:
            raise UnsupportedNFE(f"quantized base: {err}", err.reason) from None

    # ---- calibration: a prepared artifact ----

    def prepare_code(self) -> str:
        from harness.methods.family_solver import preparation_code_hash

        quantization = hashlib.sha256()  # the quantisation code makes the artifact too
        from pathlib import Path

        for path in sorted((Path(__file__).resolve().parents[1] / "quantization").glob("*.py")):
            quantization.update(path.name.encode() + b"\n" + path.read_bytes())
        return preparation_code_hash("harness.methods.family_solver") + quantization.hexdigest()[:16]

    def prepare(self, denoiser, nfe, calibration_seed) -> dict:
        from harness.quantization import quantize

        network = network_of(denoiser)
        inputs, summary = calibration_inputs(denoiser, network, self.calibration, calibration_seed)
        qnet = quantize(network.module, self.scheme, inputs, simulate=self.simulate, fp32_modules=self.fp32_modules,
                        compile=False, progress=True)
        return {"tensors": qnet.artifact.tensors, "meta": qnet.artifact.meta, "calibration": summary}

    def use_prepared(self, artifact: dict) -> None:
        self.artifact = artifact

    # ---- the cell ----

    def model_for(self, denoiser: Denoiser) -> Denoiser:
        from harness.quantization import fp32_size_bytes

        network = network_of(denoiser)
        if network is not denoiser:
            raise ConfigError("family quantized: the cell's model must be a network denoiser")
        if network.chunk is None:  # the quantised network is built and compiled for the adapter's chunk
            raise ConfigError("family quantized: set the model's params.network_batch to a number, not 'auto'")
        if self.prepare_scope is not None and self.artifact is None:
            raise RuntimeError("QuantizedSampler.use_prepared must give the calibration artifact first")
        qnet, built_here, build_s = self._built(network)
        swapped = network.with_network(qnet, qnet.module)
        start = time.perf_counter()
        _warm_up(swapped)  # compiles on the first call: not part of the cell's wall time
        warm_s = time.perf_counter() - start
        self._record = {**qnet.record(), "base": self.base_id, "calibration": self.calibration,
                        "calibration_summary": (self.artifact or {}).get("calibration"),
                        "fp32_size_bytes": fp32_size_bytes(network.module),
                        "int8_kernels": sum(v for k, v in qnet.kernels.items() if k.startswith("onednn.q")),
                        "kernels": dict(qnet.kernels),
                        "built_in_this_cell": built_here, "build_s": build_s, "warm_up_s": warm_s,
                        "gflops_note": "the fp32 network's FlopCounterMode count: the same multiply-adds, run at "
                                       "`precision`"}
        return swapped

    def _built(self, network: NetworkDenoiser):
        """The compiled quantised network, from this process's cache when one of the same weights, scheme and
        artifact was built before (True and the build time when built now)."""
        from harness.quantization import Artifact, net_sha256, quantize, rebuild

        module = network.module
        device = str(next(module.parameters()).device)
        artifact_digest = None
        if self.artifact is not None:
            digest = hashlib.sha256(json.dumps(self.artifact["meta"], sort_keys=True, default=str).encode())
            for name in sorted(self.artifact["tensors"]):
                digest.update(name.encode() + self.artifact["tensors"][name].contiguous().numpy().tobytes())
            artifact_digest = digest.hexdigest()
        key = (net_sha256(module), self.scheme, self.simulate, self.fp32_modules, artifact_digest, device,
               network.chunk, self.compile)
        if key in _BUILT:
            return _BUILT[key], False, 0.0
        start = time.perf_counter()
        if self.artifact is not None:
            qnet = rebuild(module, Artifact(self.artifact["tensors"], self.artifact["meta"]), compile=self.compile)
        else:
            qnet = quantize(module, self.scheme, fp32_modules=self.fp32_modules, compile=self.compile, progress=False)
        if qnet.batch_range is not None:  # a compiled batch that divides the adapter's chunk: no padded rows
            lo, hi = qnet.batch_range
            divisors = [d for d in range(lo, hi + 1) if network.chunk % d == 0]
            qnet.compiled_batch = max(divisors) if divisors else min(network.chunk, hi)
        _BUILT[key] = qnet
        return qnet, True, time.perf_counter() - start

    def record(self) -> dict:
        return {"quantization": self._record}

    def sample(self, denoiser, noise, nfe, cond=None, generator=None):
        """`denoiser`: the cell's model with the quantised network (model_for), counted."""
        return self.base.sample(denoiser, noise, nfe, cond, generator)


def _warm_up(denoiser: NetworkDenoiser) -> None:
    info = denoiser.info
    x = torch.zeros((denoiser.chunk, *info.data_shape), dtype=info.dtype, device=info.device)
    cond = denoiser.conditions(0, range(denoiser.chunk))
    sigma = float(denoiser.process.sigma(np.mean(denoiser.process.t_range)))
    with torch.no_grad():
        for _ in range(2):  # the second call runs the compiled graph as sampling will
            denoiser(x, sigma, cond)


def native_timesteps(process, kind: str, count: int, seed: int) -> np.ndarray:
    """The chooser's time steps in the process's native time (training steps for a discrete VP process)."""
    from harness.quantization import calibration_timesteps
    from harness.schedules import VPDiscrete

    t_lo, t_hi = process.t_range
    T = int(round(t_hi - t_lo)) + 1 if isinstance(process, VPDiscrete) else 1000
    index = np.asarray(calibration_timesteps(kind, T, count, seed), dtype=np.float64)
    return t_lo + index * (t_hi - t_lo) / (T - 1)


def calibration_inputs(denoiser: Denoiser, network: NetworkDenoiser, calibration: dict, seed: int):
    """(list of (x_t, t, labels) batches, summary) from the fp32 network's own trajectories: a forward pre-hook
    on the network module records its inputs while `trajectories` DDIM runs sample (in groups of at most one
    network chunk, so each denoiser call is one module call whose first rows are the group's)."""
    from harness.methods.family_solver import SOLVERS  # importing it registers the solvers
    from harness.noise import SampleNoise
    from harness.schedules import sigma_grid
    from tqdm.auto import tqdm

    K, steps = calibration["trajectories"], calibration["trajectory_steps"]
    process, info = denoiser.process, denoiser.info
    sigmas = [float(s) for s in sigma_grid(process, steps, {"kind": "time_uniform"})]
    group = min(K, network.chunk)
    recorded = []  # per group: per step (x_t [g, ...], t [g], labels [g] or None)

    def hook(module, args, kwargs):
        x_t, t = args[0], args[1]
        labels = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
        rows = current["rows"]
        recorded[-1].append((x_t[:rows].detach().clone(), torch.as_tensor(t).reshape(-1)[:rows].detach().clone()
                             if torch.as_tensor(t).numel() > 1 else torch.as_tensor(t).expand(rows).clone(),
                             None if labels is None else labels[:rows].detach().clone()))

    current = {"rows": 0}
    handle = network.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in tqdm(range(0, K, group), desc="calibration trajectories", leave=False):
            rows = range(start, min(start + group, K))
            current["rows"] = len(rows)
            recorded.append([])
            noise = SampleNoise(seed, rows, device=info.device).randn(info.data_shape, dtype=info.dtype)
            cond = denoiser.conditions(seed, rows)
            with torch.no_grad():
                SOLVERS["euler"].fn(lambda x, s: denoiser(x, s, cond), noise * process.prior_std(sigmas[0]), sigmas)
    finally:
        handle.remove()
    step_t = np.array([float(t[0]) for _, t, _ in recorded[0]])
    wanted = native_timesteps(process, calibration["timesteps"], calibration["samples"], seed)
    picked = []
    for i, t_i in enumerate(wanted):
        k = i % K
        step = int(np.abs(step_t - t_i).argmin())
        x, t, c = recorded[k // group][step]
        r = k % group
        picked.append((x[r], t[r], None if c is None else c[r]))
    batches = []
    for s in range(0, len(picked), GRAPH_ROWS):
        part = picked[s:s + GRAPH_ROWS]
        if len(part) < 2:  # the exported graph takes at least two rows: one more from the start
            part = part + picked[:1]
        batches.append((torch.stack([p[0] for p in part]), torch.stack([p[1] for p in part]).float(),
                        None if part[0][2] is None else torch.stack([p[2] for p in part])))
    used = np.array([float(p[1]) for p in picked])
    summary = {"inputs": len(picked), "trajectories": K, "trajectory_steps": steps, "timesteps": calibration["timesteps"],
               "t_mean": float(used.mean()), "t_std": float(used.std()), "distinct_t": int(len(np.unique(used)))}
    return batches, summary
