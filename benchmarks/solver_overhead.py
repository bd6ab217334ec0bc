"""Per-step non-network overhead: stepbench's solvers versus the diffusers scheduler of the same
algorithm, side by side in one run.

The network costs nothing (it returns a fixed tensor), so what is timed is everything else a sampling
loop does per network evaluation: schedule bookkeeping, the update arithmetic, wrappers (stepbench's
Denoiser call and NFE counter; diffusers' scale_model_input and step). Batch 64 x 3 x 32 x 32 float32
on CPU. Prints a table and, last, `worst_ratio_vs_diffusers=X` (stepbench / diffusers, worst pair).

Stochastic solvers also draw a fresh Gaussian per element and step. Both sides draw the same count
from torch's CPU generators under the same contract, one generator per sample (what makes a sample
independent of its batch; diffusers takes a list of generators for that, `--diffusers-generator one`
gives it its single-generator loop instead), and that draw is most of such a step whoever implements
the solver. The draws are timed on both sides and shown in their own columns; the ratio, and so
`worst_ratio_vs_diffusers`, compares what is left, the solver's own work. The ratio with the draws
included is printed too.

    python benchmarks/solver_overhead.py [--steps 25] [--repeats 15] [--diffusers-generator per-sample|one]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
import time

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    IPNDMScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SASolverScheduler,
    UniPCMultistepScheduler,
)

from diffusers.utils import logging as diffusers_logging

from harness.methods.family_solver import SOLVERS, SolverSampler
from harness.models.base import Denoiser, DenoiserInfo
from harness.nfe import CountingDenoiser
from harness.noise import SampleNoise
from harness.schedules import VPDiscrete

SHAPE = (64, 3, 32, 32)
BETAS = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)

# stepbench method spec -> diffusers scheduler running the same algorithm
PAIRS = [
    ({"solver": "euler"}, lambda: DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True)),
    ({"solver": "euler"}, lambda: EulerDiscreteScheduler(**BETAS)),
    ({"solver": "heun"}, lambda: HeunDiscreteScheduler(**BETAS)),
    ({"solver": "dpmpp_2m"}, lambda: DPMSolverMultistepScheduler(**BETAS, solver_order=2)),
    ({"solver": "dpmpp_3m"}, lambda: DPMSolverMultistepScheduler(**BETAS, solver_order=3)),
    ({"solver": "sde_dpmpp_2m"}, lambda: DPMSolverMultistepScheduler(**BETAS, algorithm_type="sde-dpmsolver++")),
    ({"solver": "sde_dpmpp_3m"},
     lambda: DPMSolverMultistepScheduler(**BETAS, algorithm_type="sde-dpmsolver++", solver_order=3)),
    ({"solver": "dpmpp_2s"}, lambda: DPMSolverSinglestepScheduler(**BETAS, solver_order=2)),
    ({"solver": "dpmpp_3s"}, lambda: DPMSolverSinglestepScheduler(**BETAS, solver_order=3)),
    ({"solver": "unipc"}, lambda: UniPCMultistepScheduler(**BETAS, solver_type="bh2")),
    ({"solver": "unipc", "params": {"variant": "bh1"}}, lambda: UniPCMultistepScheduler(**BETAS, solver_type="bh1")),
    ({"solver": "deis_3m"}, lambda: DEISMultistepScheduler(**BETAS, solver_order=3)),
    ({"solver": "pndm"}, lambda: PNDMScheduler(**BETAS)),
    ({"solver": "plms"}, lambda: PNDMScheduler(**BETAS, skip_prk_steps=True)),
    ({"solver": "ipndm"}, lambda: IPNDMScheduler()),
    ({"solver": "lms"}, lambda: LMSDiscreteScheduler(**BETAS)),
    ({"solver": "euler_ancestral"}, lambda: EulerAncestralDiscreteScheduler(**BETAS)),
    ({"solver": "euler_ancestral", "params": {"eta": 1.0}}, lambda: DDPMScheduler(**BETAS)),
    ({"solver": "dpm_solver_2"}, lambda: KDPM2DiscreteScheduler(**BETAS)),
    ({"solver": "dpm2_ancestral"}, lambda: KDPM2AncestralDiscreteScheduler(**BETAS)),
    ({"solver": "ddpm_large"}, lambda: DDPMScheduler(**BETAS, variance_type="fixed_large")),
    ({"solver": "sa_solver"}, lambda: SASolverScheduler(**BETAS)),  # both defaults: orders 2, 2, tau on 200..800
    ({"solver": "sa_solver", "params": {"prediction": "noise"}},
     lambda: SASolverScheduler(**BETAS, algorithm_type="noise_prediction")),
]


class ConstantDenoiser(Denoiser):
    """A network that costs nothing: always the same x0."""

    def __init__(self, x0: torch.Tensor):
        self.x0 = x0
        self.info = DenoiserInfo(data_shape=SHAPE[1:], data_range=(-1, 1), prediction="x0",
                                 process=VPDiscrete.from_config(**BETAS), dtype=torch.float32)

    def denoise(self, x, sigma, cond=None):
        return self.x0


class DrawClock:
    """Seconds spent inside a Gaussian-drawing function, summed over calls."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, draw):
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            out = draw(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out

        return wrapped


@contextlib.contextmanager
def timed_attribute(owner, name: str, clock: DrawClock):
    """Route owner.name through `clock` while inside the block."""
    original = getattr(owner, name)
    setattr(owner, name, clock.timed(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def stepbench_run(spec: dict, nfe: int, x_T: torch.Tensor, x0: torch.Tensor):
    """One timed run of stepbench's real sampling path (SolverSampler -> NFE counter -> Denoiser):
    (seconds, seconds drawing noise), each per network evaluation."""
    sampler = SolverSampler({"family": "solver", **spec})
    denoiser = ConstantDenoiser(x0)

    def run() -> tuple[float, float]:
        counted = CountingDenoiser(denoiser)
        noise, clock = SampleNoise(0, range(SHAPE[0])), DrawClock()
        with timed_attribute(noise, "randn", clock):
            t0 = time.perf_counter()
            sampler.sample(counted, x_T, nfe, None, noise)
            elapsed = time.perf_counter() - t0
        assert counted.nfe_per_sample(SHAPE[0]) == nfe
        return elapsed / nfe, clock.seconds / nfe

    return run


def diffusers_generator(kind: str):
    """Per sample: one generator each, the noise contract stepbench keeps; one: a single generator."""
    if kind == "one":
        return torch.Generator().manual_seed(0)
    return [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]


def diffusers_run(make_scheduler, steps: int, x_T: torch.Tensor, eps: torch.Tensor, generator_kind: str):
    """One timed run of the usual diffusers loop (set_timesteps, scale_model_input, step):
    (seconds, seconds drawing noise), each per network evaluation."""

    def run() -> tuple[float, float]:
        sched = make_scheduler()
        extra = {"generator": diffusers_generator(generator_kind)} if _takes_generator(sched) else {}
        module, clock = sys.modules[type(sched).__module__], DrawClock()
        draws = timed_attribute(module, "randn_tensor", clock) if hasattr(module, "randn_tensor") \
            else contextlib.nullcontext()
        with draws:
            t0 = time.perf_counter()
            sched.set_timesteps(steps)
            x = x_T * sched.init_noise_sigma
            for t in sched.timesteps:
                sched.scale_model_input(x, t)
                x = sched.step(eps, t, x, **extra).prev_sample
            elapsed = time.perf_counter() - t0
        return elapsed / len(sched.timesteps), clock.seconds / len(sched.timesteps)

    return run


def fastest_of(runs, repeats: int) -> list[tuple[float, float]]:
    """Alternate the runs so load from other processes hits both alike; keep each one's fastest
    (seconds without draws, seconds drawing), the least disturbed estimates of each cost. The first
    round only warms up."""
    best = [(float("inf"), float("inf"))] * len(runs)
    for round_ in range(repeats + 1):
        for i, run in enumerate(runs):
            elapsed, drawing = run()
            if round_:
                best[i] = (min(best[i][0], elapsed - drawing), min(best[i][1], drawing))
    return best


def _takes_generator(sched) -> bool:
    return "generator" in inspect.signature(sched.step).parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--diffusers-generator", choices=["per-sample", "one"], default="per-sample",
                        help="noise generators diffusers' stochastic schedulers draw from (default: %(default)s)")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # schedulers warn about their own defaults on every build
    gen = torch.Generator().manual_seed(0)
    x_T, x0, eps = (torch.randn(SHAPE, generator=gen) for _ in range(3))

    rows, ratios, with_draws = [], [], []
    for spec, make_scheduler in PAIRS:
        name = spec["solver"]
        label = name + "".join(f" {k}={v}" for k, v in spec.get("params", {}).items())
        scheduler_name = type(make_scheduler()).__name__
        if name not in SOLVERS:
            rows.append((label, scheduler_name, None, None, "not implemented in stepbench yet"))
            continue
        (ours, ours_draws), (theirs, theirs_draws) = fastest_of(
            [stepbench_run(spec, SOLVERS[name].nfe_rule(spec.get("params", {})).nfe(args.steps), x_T, x0),
             diffusers_run(make_scheduler, args.steps, x_T, eps, args.diffusers_generator)], args.repeats)
        ratios.append(ours / theirs)
        with_draws.append((ours + ours_draws) / (theirs + theirs_draws))
        rows.append((label, scheduler_name, (ours, ours_draws), (theirs, theirs_draws),
                     f"ratio {ratios[-1]:.3f} ({with_draws[-1]:.3f} with draws)"))

    print(f"per-network-evaluation overhead, batch {'x'.join(map(str, SHAPE))} float32, CPU "
          f"({torch.get_num_threads()} threads), fastest of {args.repeats} alternating runs; "
          f"microseconds, noise draws apart (diffusers' generators: {args.diffusers_generator})")
    print(f"{'stepbench':<26} {'diffusers':<34} {'ours':>8} {'draws':>7} {'diffusers':>10} {'draws':>7}  note")
    for name, sched, ours, theirs, note in rows:
        cells = [f"{ours[0] * 1e6:8.1f}", f"{ours[1] * 1e6:7.1f}", f"{theirs[0] * 1e6:10.1f}",
                 f"{theirs[1] * 1e6:7.1f}"] if ours else [f"{'-':>8}", f"{'-':>7}", f"{'-':>10}", f"{'-':>7}"]
        print(f"{name:<26} {sched:<34} {' '.join(cells)}  {note}")
    print(f"worst ratio with the noise draws counted as overhead: {max(with_draws):.3f}")
    print(f"worst_ratio_vs_diffusers={max(ratios):.3f}")


if __name__ == "__main__":
    main()
