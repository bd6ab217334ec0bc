"""DualFast (Yu, Luo, Wang & Zhao 2025, "DualFast: Dual-Speedup Framework for Fast Sampling of
Diffusion Models", arXiv:2506.13058).

The paper splits the sampling error into the discretisation error (what high-order solvers reduce) and
the approximation error of the network's prediction, finds the approximation error smaller at larger
noise levels, and reduces it without extra NFE by mixing the current noise prediction with the one
made at the first (largest) time step, which every sampler already has: the current prediction is
extrapolated away from the first one,

    eps~_i = eps_i + c_i (eps_i - eps_0),        eps_0 = eps(x_T, sigma_max),

and the base solver (DDIM = euler, DPM-Solver++ = dpmpp_2m, UniPC, ...) runs unchanged on the mixed
prediction (handed to it as x0 = x - sigma eps~), so both error reductions add up ("dual
speed-up"): the base solver keeps reducing the discretisation error; DualFast is a model wrapper.

Faithful: mixing in the noise prediction with the first step's, no extra NFE, any base solver.
Differs / unverified: we could not read the paper's full text offline. The coefficient decays
linearly from `mix` at the first step to 0 at the last (c_i = mix * (1 - i / (steps - 1))), so the
final denoising step is the base solver's own; the paper's schedule for c and its default may differ
(mix = 0.4 was chosen among 0.1, 0.2, 0.4 on gmm2d with DDIM). On the embedded exact models the
network has no approximation error, so only the effect on the discretisation error is measured: it
helps DDIM on gmm2d and digits-ideal and DPM-Solver++(2M) on digits-ideal, and hurts DPM-Solver++(2M)
on gmm2d.

NFE rule: the base solver's (bases spending one evaluation per step); the wrapper adds none.
"""

from __future__ import annotations

from harness.methods.solver_base import NFERule, solver
from harness.methods.teleport import base_solver


@solver("dualfast", order=0)  # not convergent: the mixing stays O(1) as steps grow
def dualfast(model, x, sigmas, noise=None, base="euler", mix=0.4):
    """`base` on noise predictions extrapolated away from the first step's (see the module docstring)."""
    base_fn = base_solver(base, NFERule(), "dualfast")
    steps = len(sigmas) - 1
    first, calls = [], [0]

    def mixed_model(x, sigma):
        denoised = model(x, sigma)
        eps = (x - denoised) / sigma
        i = calls[0]
        calls[0] += 1
        if i == 0:
            first.append(eps)
            return denoised
        c = mix * (1 - i / (steps - 1))
        return x - sigma * (eps + c * (eps - first[0]))

    return base_fn(mixed_model, x, sigmas, noise=noise)
