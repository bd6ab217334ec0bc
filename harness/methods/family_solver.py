"""family: solver — a training-free solver function on a time-step schedule of the model's process."""

from __future__ import annotations

import hashlib
import importlib
import sys
from functools import lru_cache
from pathlib import Path

import torch

from harness.errors import ConfigError, UnsupportedNFE, valid_names
from harness.guidance import check_thresholding, dynamic_threshold
# Importing a solver module registers its solvers.
from harness.methods import solvers  # noqa: F401  (euler, heun, dpmpp_2m)
from harness.methods import ancestral, deis, deis_tab, dpm_solver, lms, pndm, unipc  # noqa: F401  (the solver zoo)
from harness.methods import sa_solver  # noqa: F401  (SA-Solver)
from harness.methods import dc_solver, dmcmc, dpm_solver_v3, dualfast, momentum  # noqa: F401  (seed papers)
from harness.methods import schedule_search, teleport, time_shift  # noqa: F401  (seed papers)
from harness.methods import restart  # noqa: F401  (Restart sampling)
from harness.methods.base import Sampler
from harness.methods.solver_base import SOLVERS
from harness.schedules import fixed_steps, sigma_grid


def import_solver_module(module: str) -> None:
    """Import a user's module of solvers (methods.yaml `module:`), which register themselves with
    harness.methods.solver_base.solver: a new sampler is benchmarked without editing stepbench, under
    the same noise, NFE audit and metrics as the built-in ones."""
    try:
        importlib.import_module(module)
    except Exception as err:  # not found, or failing while it runs: either way one line, not a traceback
        first_line = (str(err).splitlines() or [""])[0]
        raise ConfigError(f"solver module {module!r} cannot be imported: {type(err).__name__}: {first_line}") from None


# What a preparation can run: the solvers (it calls others by name, e.g. reference runs and base solvers), the
# schedules, the noise and the model adapters; report, metric and workflow code is left out. Read from the
# files, not from the loaded modules: the workflow, the prepare job and the cell must all get the same key.
HARNESS = Path(__file__).resolve().parents[1]
PREPARATION_CODE = ("methods/*.py", "models/*.py", "schedules.py", "noise.py")


@lru_cache(maxsize=None)
def preparation_code_hash(module: str) -> str:
    """The sources of the PREPARATION_CODE files and of `module` (a user's own solvers), hashed."""
    files = sorted({path for pattern in PREPARATION_CODE for path in HARNESS.glob(pattern)})
    if not module.startswith("harness."):  # a user's module of solvers
        files.append(Path(sys.modules[module].__file__))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\n" + path.read_bytes())
    return digest.hexdigest()[:16]


class SolverSampler(Sampler):
    """family: solver — a solver function on a time-step schedule of the model's process."""

    family = "solver"

    def __init__(self, spec: dict):
        super().__init__(spec)
        if "module" in spec:
            import_solver_module(spec["module"])
        name = spec["solver"]
        if name not in SOLVERS:
            raise ConfigError(f"solver {name!r} unknown{valid_names(name, sorted(SOLVERS))}")
        self.name = name
        self.solver = SOLVERS[name]
        self.schedule = spec.get("schedule", {"kind": "edm_rho", "rho": 7.0})
        self.params = spec.get("params", {})
        self.thresholding = check_thresholding(spec.get("thresholding"), "thresholding")
        self.nfe_rule = self.solver.nfe_rule(self.params)
        self.prepare_scope = self.solver.prepare_scope
        self.prepared: dict | None = None

    def summary(self) -> dict[str, str]:
        schedule = ", ".join(f"{value}" if key == "kind" else f"{key}={value}" for key, value in self.schedule.items())
        return {
            "family": self.family,
            "solver": self.name,
            "NFE": self.nfe_rule.describe(),
            "side data": f"per {self.prepare_scope}" if self.prepare_scope else "-",
            "schedule": schedule,
            "params": ", ".join(f"{key}={value}" for key, value in self.params.items()),
        }

    def check_nfe(self, nfe: int) -> None:
        steps = self.nfe_rule.steps(nfe, self.name)
        fixed = fixed_steps(self.schedule)  # a list of levels meets one budget only
        if fixed is not None and fixed != steps:
            only = self.nfe_rule.nfe(fixed)
            raise UnsupportedNFE(f"{self.name}: its explicit schedule has {fixed} levels, so only NFE={only} "
                                 f"(or set interpolate: true)", reason=f"explicit schedule: NFE {only} only")

    def sigmas(self, process, nfe: int):
        return [float(s) for s in sigma_grid(process, self.nfe_rule.steps(nfe, self.name), self.schedule)]

    def prepare(self, denoiser, nfe, calibration_seed):
        sigmas = self.sigmas(denoiser.process, nfe) if self.prepare_scope == "nfe" else None
        with torch.no_grad():
            return self.solver.prepare(denoiser, sigmas, calibration_seed, **self.params)

    def prepare_code(self) -> str:
        return preparation_code_hash(self.solver.prepare.__module__)

    def use_prepared(self, artifact: dict) -> None:
        self.prepared = artifact

    def sample(self, denoiser, noise, nfe, cond=None, generator=None):
        extra = {}
        if self.prepare_scope is not None:
            if self.prepared is None:
                raise RuntimeError(f"solver {self.name!r} needs its prepared artifact (harness.prepared.load)")
            extra["prepared"] = self.prepared
        if self.solver.needs_process:
            extra["process"] = denoiser.process
        sigmas = (self.prepared or {}).get("sigmas") or self.sigmas(denoiser.process, nfe)
        x = noise * denoiser.process.prior_std(sigmas[0])

        def model(x, sigma):
            x0 = denoiser(x, sigma, cond)
            return x0 if self.thresholding is None else dynamic_threshold(x0, *self.thresholding)

        with torch.no_grad():
            return self.solver.fn(model, x, sigmas, noise=generator, **self.params, **extra)
