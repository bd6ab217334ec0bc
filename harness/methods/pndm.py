"""Pseudo numerical methods (Liu et al. 2022): Runge-Kutta and Adams-Bashforth combinations of the noise
prediction, each applied through the DDIM "transfer" x~' = x~ - (sigma~ - sigma~') eps (exact on scaled
variables). The Adams-Bashforth weights are the constant ones of equal steps, as in the paper and in
diffusers; the last step to sigma~ = 0 is a transfer like the others.
"""

from __future__ import annotations

import torch

from harness.methods.solver_base import NFERule, solver

# Adams-Bashforth weights for 1..4 past values, newest first
ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
PRK_STEPS = 3  # PNDM's pseudo Runge-Kutta warm-up: 3 steps of 4 evaluations


def _eps(model, x, sigma, out=None):
    """The noise prediction eps = (x - D) / sigma as the pair (x - D, sigma): one kernel, the 1/sigma is
    left to the float weights of the transfer. `out` recycles a tensor that has left the history."""
    return torch.sub(x, model(x, sigma), out=out), sigma


def _recycled(history):
    """The buffer of the prediction about to leave a full history (newest first, 4 deep), else None.
    Reusing it, and updating x in place, keeps the loop from allocating (and on CPU page-faulting)
    two fresh batch-sized tensors per step."""
    return history[-1][0] if len(history) == len(ADAMS_BASHFORTH) else None


def _transfer_(x, weighted_eps, s, s_next):
    """x~ - (s - s_next) * sum(w * eps) over (w, eps) pairs, in place on x: one fused multiply-add per
    term."""
    for w, (diff, sigma) in weighted_eps:
        x.add_(diff, alpha=(s_next - s) * w / sigma)
    return x


def _transfer(x, weighted_eps, s, s_next):
    """`_transfer_` on a copy of x (the pseudo Runge-Kutta stages, which keep x)."""
    return _transfer_(x.clone(), weighted_eps, s, s_next)


def _adams_bashforth_(x, history, s, s_next):
    """The transfer along the Adams-Bashforth combination of `history` (newest first, at most 4), in place."""
    return _transfer_(x, zip(ADAMS_BASHFORTH[len(history) - 1], history), s, s_next)


@solver("pndm", order=2, nfe=NFERule(per_step=1, saved_at_end=-9, min_steps=PRK_STEPS + 1))
def pndm(model, x, sigmas, noise=None):
    """PNDM: 3 pseudo Runge-Kutta steps (4 evaluations each, midpoints halfway in lambda), then
    pseudo linear multistep (AB4) steps: NFE = steps + 9. Constant AB weights on unequal steps make it
    second order on smooth schedules."""
    x = x.clone()  # updated in place below; the caller's tensor stays as it was
    history = []  # noise predictions at the start of each step, newest first
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = _eps(model, x, s, out=_recycled(history))
        history = [eps] + history[:3]
        if i < PRK_STEPS:
            s_mid = (s * s_next) ** 0.5
            k2 = _eps(model, _transfer(x, [(1.0, eps)], s, s_mid), s_mid)
            k3 = _eps(model, _transfer(x, [(1.0, k2)], s, s_mid), s_mid)
            k4 = _eps(model, _transfer(x, [(1.0, k3)], s, s_next), s_next)
            _transfer_(x, [(1 / 6, eps), (2 / 6, k2), (2 / 6, k3), (1 / 6, k4)], s, s_next)
        else:
            _adams_bashforth_(x, history, s, s_next)
    return x


@solver("plms", order=2, nfe=NFERule(per_step=1, saved_at_end=-1, min_steps=2))
def plms(model, x, sigmas, noise=None):
    """PLMS as diffusers' PNDMScheduler(skip_prk_steps=True), e.g. Stable Diffusion's: a first step
    averaging the noise predictions at both ends (2 evaluations), then AB2, AB3, AB4: NFE = steps + 1."""
    x = x.clone()
    history = []
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        eps = _eps(model, x, s, out=_recycled(history))
        history = [eps] + history[:3]
        if i == 0:
            eps_end = _eps(model, _transfer(x, [(1.0, eps)], s, s_next), s_next)
            _transfer_(x, [(1 / 2, eps), (1 / 2, eps_end)], s, s_next)  # eps_end is not kept in the history
        else:
            _adams_bashforth_(x, history, s, s_next)
    return x


@solver("ipndm", order=2)
def ipndm(model, x, sigmas, noise=None):
    """iPNDM (Zhang & Chen 2023): AB on the noise prediction with lower-order warm-up (AB1..AB4), one
    evaluation per step."""
    x = x.clone()
    history = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        history = [_eps(model, x, s, out=_recycled(history))] + history[:3]
        _adams_bashforth_(x, history, s, s_next)
    return x
