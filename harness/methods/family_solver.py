"""family: solver — a training-free solver function on a time-step schedule of the model's process."""

from __future__ import annotations

import torch

from harness.errors import ConfigError
from harness.methods import solvers  # noqa: F401  (registers the solvers)
from harness.methods.base import Sampler
from harness.methods.solver_base import SOLVERS
from harness.schedules import sigma_grid

class SolverSampler(Sampler):
    """family: solver — a solver function on a time-step schedule of the model's process."""

    family = "solver"

    def __init__(self, spec: dict):
        super().__init__(spec)
        name = spec["solver"]
        if name not in SOLVERS:
            raise ConfigError(f"solver {name!r} unknown; valid: {', '.join(sorted(SOLVERS))}")
        self.name = name
        self.solver = SOLVERS[name]
        self.schedule = spec.get("schedule", {"kind": "edm_rho", "rho": 7.0})
        self.params = spec.get("params", {})

    def check_nfe(self, nfe: int) -> None:
        self.solver.nfe.steps(nfe, self.name)

    def sigmas(self, process, nfe: int):
        return [float(s) for s in sigma_grid(process, self.solver.nfe.steps(nfe, self.name), self.schedule)]

    def sample(self, denoiser, noise, nfe, cond=None, generator=None):
        sigmas = self.sigmas(denoiser.process, nfe)
        x = noise * denoiser.process.prior_std(sigmas[0])

        def model(x, sigma):
            return denoiser(x, sigma, cond)

        with torch.no_grad():
            return self.solver.fn(model, x, sigmas, noise=generator, **self.params)
