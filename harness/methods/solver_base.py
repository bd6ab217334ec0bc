"""What every solver shares: the registry, the one signature and the NFE rules.

    solver(model, x, sigmas, noise=None, **params) -> x0

`model(x, sigma)` is the Denoiser (x0 prediction on scaled variables), `x` starts at
noise * prior_std(sigmas[0]), and `sigmas` holds steps + 1 decreasing values ending in 0 (a Python
list of floats). `noise` gives per-sample draws for stochastic solvers (harness.noise.SampleNoise).
Schedules are separate (harness.schedules), so every solver runs on every schedule and every model.
Solver modules register with @solver; harness.methods.family_solver imports them all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from harness.errors import UnsupportedNFE

# ---- NFE rules: how many network evaluations a solver spends for a number of steps ----


@dataclass(frozen=True)
class NFERule:
    """nfe(steps) = per_step * steps - saved_at_end, for steps >= min_steps."""

    per_step: int = 1
    # e.g. Heun skips its corrector on the final step to sigma = 0 (1); negative for warm-up costs
    # (PNDM's Runge-Kutta start spends 9 more)
    saved_at_end: int = 0
    min_steps: int = 1

    def nfe(self, steps: int) -> int:
        return self.per_step * steps - self.saved_at_end

    def steps(self, nfe: int, name: str) -> int:
        steps, rem = divmod(nfe + self.saved_at_end, self.per_step)
        if rem == 0 and steps >= self.min_steps:
            return steps
        valid = [self.nfe(s) for s in range(self.min_steps, self.min_steps + 4096)]
        below = [v for v in valid if v < nfe]
        above = [v for v in valid if v > nfe]
        nearest = ", ".join(str(v) for v in (below[-1:] + above[:1]))
        raise UnsupportedNFE(
            f"{name} spends {self.describe()} network evaluations, so NFE={nfe} cannot be met; nearest: {nearest}",
            reason=f"NFE = {self.describe()}; nearest {nearest}",
        )

    def describe(self) -> str:
        base = "steps" if self.per_step == 1 else f"{self.per_step}*steps"
        return base + (f"{-self.saved_at_end:+d}" if self.saved_at_end else "")


@dataclass(frozen=True)
class Solver:
    fn: Callable
    nfe: NFERule | Callable[..., NFERule]  # a function of the params where they change the cost (restart)
    order: int  # order of accuracy of the deterministic ODE solver (for convergence checks)
    # Side data made once in its own job (harness.prepared) and passed to `fn` as prepared=...:
    #   prepare(denoiser, sigmas, calibration_seed, **params) -> dict
    # with sigmas the cell's schedule when prepare_scope == "nfe", None when it is "model".
    # An artifact holding "sigmas" replaces the schedule (searched time steps).
    prepare: Callable | None = None
    prepare_scope: str | None = None
    # The sampler passes the model's noise process as process=... (solvers whose update needs alpha or the
    # native time t, which the sigma~ list does not carry).
    needs_process: bool = False

    def nfe_rule(self, params: dict) -> NFERule:
        return self.nfe(**params) if callable(self.nfe) else self.nfe

    def param_names(self) -> list[str] | None:
        """The methods.yaml params it takes (its function's keywords and its prepare's), or None where its
        function takes any keyword (a user's solver may forward them) and there is nothing to check against."""
        functions = [f for f in (self.fn, self.prepare) if f is not None]
        names: list[str] = []
        for f in functions:
            for p in list(inspect.signature(f).parameters.values())[3:]:  # after (model, x, sigmas) / (denoiser, ...)
                if p.kind == p.VAR_KEYWORD:
                    if self.prepare is None:
                        return None
                elif p.name not in ("noise", "prepared", "process") and p.name not in names:
                    names.append(p.name)
        return names


SOLVERS: dict[str, Solver] = {}


def solver(name: str, order: int, nfe: NFERule | Callable[..., NFERule] = NFERule(), prepare: Callable | None = None,
           prepare_scope: str | None = None, needs_process: bool = False):
    if (prepare is None) != (prepare_scope is None) or prepare_scope not in (None, "model", "nfe"):
        raise ValueError(f"solver {name!r}: give prepare together with prepare_scope 'model' or 'nfe'")

    def wrap(fn):
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} registered twice")
        SOLVERS[name] = Solver(fn, nfe, order, prepare, prepare_scope, needs_process)
        return fn

    return wrap


# ---- shared by the solvers ----


def require_noise(noise, name: str) -> None:
    if noise is None:
        raise ValueError(f"{name} is stochastic and needs per-sample noise (harness.noise.SampleNoise)")


def require_process(process, name: str):
    if process is None:
        raise ValueError(f"{name} needs the model's noise process as process=... (registered needs_process)")
    return process


def finite_rows(*tensors) -> torch.Tensor:
    """Which samples (batch rows) are finite (no NaN/Inf) in every one of `tensors`. Preparations score
    and average over these only: one diverged calibration sample would make every mean or loss NaN."""
    return torch.stack([torch.isfinite(t).flatten(1).all(1) for t in tensors]).all(0)


def keep_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """t's rows where mask holds; t itself when all do (no copy; the same numbers either way)."""
    return t if bool(mask.all()) else t[mask]


def combine(terms):
    """sum(c * t for c, t in terms) for float weights c (two terms or more), into one new tensor.

    Per term one fused multiply-add kernel (add_ with alpha) instead of a multiply, an add and a
    temporary each; solvers fold their update into one weight per tensor to use it.
    """
    (c0, t0), (c1, t1), *rest = terms
    out = torch.add(t0, t1, alpha=c1) if c0 == 1 else torch.mul(t0, c0).add_(t1, alpha=c1)
    for c, t in rest:
        out.add_(t, alpha=c)
    return out
