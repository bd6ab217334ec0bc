"""Calibration time steps and the one input convention every scheme shares.

Time-step choosers (training-discretisation indices in [0, T-1]; the caller takes x_t from the
full-precision model's own sampling trajectory at the nearest step):

- ``uniform`` (Q-Diffusion): evenly spaced over the trajectory, ``linspace(0, T-1, count)``
  rounded. Q-Diffusion's scripts take every (n_steps // cali_st)-th step of the sampling run;
  PTQ4DM's ``generate_t(..., "uniform")`` is ``linspace(0, T, n).round().clamp(0, T-1)``. The seed
  is accepted and unused: the grid is deterministic.
- ``ptq4dm_normal`` (PTQ4DM's NDTC): ``t = int(N(0.4, 0.4) * T)`` truncated toward zero and
  clipped to [0, T-1], as in PTQ4DM's ``generate_t(..., "normal")``. Their
  ``backward_t_calib_data_generator`` matches that t against the index of the sampling loop, which
  counts from the noisy end (index 0 is timestep T-1), and feeds it to the network as the time
  step; we follow the paper's description instead: t is the time step of x_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from harness.errors import ConfigError, StepbenchError, valid_names

TIMESTEP_KINDS = ("uniform", "ptq4dm_normal")
PTQ4DM_MEAN, PTQ4DM_STD = 0.4, 0.4  # fractions of T (PTQ4DM's calib_t_mode_normal_mean/std)

# what the lead draws from the fp32 trajectories: x_t [B, C, H, W], t (scalar or [B]), labels [B] or None
CalibrationInput = tuple[torch.Tensor, "torch.Tensor | float | int", "torch.Tensor | None"]


def calibration_timesteps(kind: str, num_train_timesteps: int, count: int, seed: int) -> list[int]:
    """`count` training time steps in [0, T-1] chosen per `kind`; the same list for the same seed."""
    if kind not in TIMESTEP_KINDS:
        raise ConfigError(f"calibration timesteps {kind!r} unknown{valid_names(kind, TIMESTEP_KINDS)}")
    if int(num_train_timesteps) < 1 or int(count) < 1:
        raise ConfigError(f"calibration timesteps need num_train_timesteps >= 1 and count >= 1, "
                          f"got {num_train_timesteps} and {count}")
    T = int(num_train_timesteps)
    if kind == "uniform":
        t = np.linspace(0, T - 1, int(count)).round()
    else:
        t = np.trunc(np.random.default_rng(seed).normal(PTQ4DM_MEAN, PTQ4DM_STD, int(count)) * T)
    return [int(v) for v in np.clip(t, 0, T - 1)]


def as_inputs(x_t: torch.Tensor, t, class_labels=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x [B,...] float, t float32 [B], labels int64 [B] or None) on x's device.

    Time steps enter the quantised graph as float: the histogram observer refuses int64, and a
    continuous-time solver asks for fractional steps anyway."""
    if not isinstance(x_t, torch.Tensor) or x_t.dim() < 2:
        raise StepbenchError(f"quantised network: x_t must be a tensor [B, ...], got {type(x_t).__name__}"
                             f"{' of shape ' + str(tuple(x_t.shape)) if isinstance(x_t, torch.Tensor) else ''}")
    B = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).to(torch.float32)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise StepbenchError(f"quantised network: t must be a scalar or [{B}], got shape {tuple(t.shape)}")
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, device=x_t.device).to(torch.int64)
        if class_labels.dim() == 0:
            class_labels = class_labels.expand(B)
        if class_labels.shape != (B,):
            raise StepbenchError(f"quantised network: class_labels must be [{B}], got shape {tuple(class_labels.shape)}")
    return x_t, t.contiguous(), None if class_labels is None else class_labels.contiguous()


def normalise_calibration(calibration: Sequence[CalibrationInput] | None, scheme: str) -> list[tuple]:
    """The calibration list as `as_inputs` tuples; one line if it is missing or mixes labelled and
    unlabelled inputs (the quantised graph is built either with class labels or without)."""
    if not calibration:
        raise ConfigError(f"quantization scheme {scheme!r} needs calibration inputs: a non-empty list of "
                          f"(x_t, t, class_labels) tuples")
    out = []
    for i, item in enumerate(calibration):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ConfigError(f"calibration input {i}: expected an (x_t, t, class_labels) tuple, got {type(item).__name__}")
        out.append(as_inputs(*item))
    labelled = {c is not None for _, _, c in out}
    if len(labelled) > 1:
        raise ConfigError("calibration inputs mix tuples with and without class_labels; give labels to all or none")
    return out
