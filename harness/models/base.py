"""The Denoiser interface: D(x~, sigma~, cond) -> x0_hat on scaled variables.

Every model adapter produces one. Analytic models implement `denoise` directly; networks that
predict eps, v, x0 or a flow velocity on unscaled inputs go through `NetworkDenoiser`, which is the
single place where prediction types are converted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from harness.errors import ConfigError
from harness.schedules import NoiseProcess


@dataclass
class DenoiserInfo:
    """What a sampler, a metric or the report needs to know about a model."""

    data_shape: tuple[int, ...]
    data_range: tuple[float, float]
    prediction: str  # what the wrapped network predicts: x0 | eps | v | flow
    process: NoiseProcess
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    latent: bool = False  # samples live in a latent space; `decode` maps them to data
    # class-conditional models: labels 0 .. num_classes - 1 as `cond`, null_class for "no class" (guidance)
    num_classes: int = 0
    null_class: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Denoiser(ABC):
    info: DenoiserInfo
    # exact_flow(x, sigma_from, sigma_to): the PF-ODE's solution in closed form, where a model has one
    exact_flow: Callable | None = None

    @classmethod
    def check_spec(cls, spec: dict) -> None:
        """Checks of a models.yaml entry cheap enough to run while a grid is planned (its files exist, its
        configs agree), so that a bad entry is one line before any job starts. Loading the weights is the
        jobs' work. Adapters with files to find override it."""

    @classmethod
    def guidance_refusal(cls, spec: dict) -> str | None:
        """Why the grid's classifier-free guidance cannot apply to this models.yaml entry, from the entry alone
        (its cells at a scale other than 1 are n/a; harness.models.guidance_refusal), or None where it can."""
        return None

    @abstractmethod
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """x: [B, *data_shape] scaled noisy input; sigma: [B] scaled noise levels; returns x0_hat."""

    def __call__(self, x: torch.Tensor, sigma, cond: Any = None) -> torch.Tensor:
        if isinstance(sigma, (int, float)):
            # solvers pass Python floats: one filled tensor instead of as_tensor + expand
            sigma = x.new_full((x.shape[0],), sigma)
        else:
            sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
            if sigma.ndim == 0:
                sigma = sigma.expand(x.shape[0])
        return self.denoise(x, sigma, cond)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latent models map samples to data; pixel models return them unchanged."""
        return x0

    def flops_call(self, x: torch.Tensor, sigma: float = 1.0) -> int:
        """One network call on x for harness.flops to count; returns the network rows it made (a flow: its
        token evaluations, harness.models.flow)."""
        self(x, sigma)
        return len(x)

    @property
    def process(self) -> NoiseProcess:
        return self.info.process

    # ---- conditioning: what sample i is conditioned on depends only on (seed, i), as its noise does ----

    def conditions(self, seed: int, indices) -> Any:
        """The `cond` of the samples `indices` of a cell seeded with `seed`: balanced class labels for a
        class-conditional model (harness.labels), None for an unconditional one. Text-conditional adapters give
        their prompts' encodings here."""
        if not self.info.num_classes:
            return None
        from harness.labels import sample_labels

        return torch.as_tensor(sample_labels(seed, indices, self.info.num_classes), device=self.info.device)

    def condition_record(self, seed: int, num_samples: int) -> dict[str, np.ndarray]:
        """What samples.npz keeps of the cell's conditions (the labels; a text model's prompt indices)."""
        if not self.info.num_classes:
            return {}
        from harness.labels import sample_labels

        return {"labels": sample_labels(seed, range(num_samples), self.info.num_classes)}

    def condition_mismatch(self, other: "Denoiser") -> str | None:
        """Why `other` cannot take this model's conditions, or None: a stitched pair runs both networks on the
        large model's (harness.methods.family_stitch). By default the class labels and null class must agree."""
        other = innermost(other)
        if other.info.extra.get("text"):
            return "it is text-conditional"
        mine, theirs = ((d.info.num_classes, d.info.null_class) for d in (self, other))
        if mine != theirs:
            return f"its classes (num_classes, null_class) {theirs} differ from {mine}"
        return None

    def null_condition(self, cond: Any) -> Any:
        """The unconditional model's `cond` for the rows of `cond` (guidance): the null class by default."""
        if self.info.null_class is None:
            raise ConfigError("classifier-free guidance needs a conditional model with an unconditional input "
                              "(a null class)")
        return torch.full((len(cond),), self.info.null_class, dtype=cond.dtype, device=cond.device)


class WrappedDenoiser(Denoiser):
    """A denoiser built on another (counted, guided, stitched): everything but `denoise` is the inner one's."""

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.info = inner.info
        self.exact_flow = inner.exact_flow

    def decode(self, x0):
        return self.inner.decode(x0)

    def flops_call(self, x, sigma=1.0):
        return self.inner.flops_call(x, sigma)

    def invert(self, z, cond=None, strategies=None, **settings):
        """A flow's inversion (harness.models.flow.FlowModel), passed through."""
        return self.inner.invert(z, cond, strategies, **settings)

    def conditions(self, seed, indices):
        return self.inner.conditions(seed, indices)

    def condition_record(self, seed, num_samples):
        return self.inner.condition_record(seed, num_samples)

    def null_condition(self, cond):
        return self.inner.null_condition(cond)

    def condition_mismatch(self, other):
        return self.inner.condition_mismatch(other)


def innermost(denoiser: Denoiser) -> Denoiser:
    """The adapter's denoiser under its wrappers (counted, guided, stitched)."""
    while isinstance(denoiser, WrappedDenoiser):
        denoiser = denoiser.inner
    return denoiser


def condition_rows(cond: Any, rows) -> Any:
    """Rows of a condition: a tensor, or a dict of tensors (a text model's embeddings), or None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: condition_rows(v, rows) for k, v in cond.items()}
    return cond[rows]


def condition_length(cond: Any) -> int:
    """The rows of a condition: a tensor's, or those its dict's tensors share."""
    return len(next(iter(cond.values()))) if isinstance(cond, dict) else len(cond)


def concat_conditions(conds: list) -> Any:
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {k: concat_conditions([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class NetworkDenoiser(Denoiser):
    """Wraps net(x_t, t, cond) on unscaled inputs with native time t into the scaled convention.

    x_t = alpha * x~; the network's output is converted to x0_hat according to `info.prediction`.

    The network runs on chunks of exactly `chunk` rows (the last padded): a row's output must not depend on how
    many rows share its call (the paired-noise rule), and kernels are chosen by batch size (on CPU a single row
    takes another path than two, and differs in the last bits). Padding costs at most one partial chunk a call.
    `chunk` None (params.network_batch: auto) is the largest that fits: the first call's rows, halved while the
    device runs out of memory, then kept for every later call.
    """

    def __init__(self, net: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor], info: DenoiserInfo,
                 module: torch.nn.Module | None = None, chunk: int | None = 64, rebind: Callable | None = None):
        self.net = net
        self.info = info
        self.module = module  # the network behind `net`, for transforms that need it (quantisation)
        self.chunk = chunk
        # rebind(call) -> net: the adapter's `net` with `call(x_t, t, class_labels) -> Tensor` in place of
        # the module (its label handling, output slicing and parametrisation kept)
        self._rebind = rebind

    def with_network(self, call: Callable, module: torch.nn.Module | None = None) -> "NetworkDenoiser":
        """The same denoiser with its network replaced by `call(x_t, t, class_labels)` (a quantised copy)."""
        if self._rebind is None:
            raise ConfigError(f"{type(self).__name__}: this adapter cannot swap its network (no rebind)")
        import copy

        other = copy.copy(self)
        other.net, other.module = self._rebind(call), module
        return other

    def _net_in_chunks(self, x_t, t, cond):
        if self.chunk is not None:
            return self._net_in(self.chunk, x_t, t, cond)
        chunk = len(x_t)
        while True:
            try:
                out = self._net_in(chunk, x_t, t, cond)
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk = (chunk + 1) // 2
                torch.cuda.empty_cache()
                continue
            self.chunk = chunk
            return out

    def _net_in(self, chunk, x_t, t, cond):
        outs = []
        for start in range(0, len(x_t), chunk):
            rows = slice(start, start + chunk)
            xs, ts, cs = x_t[rows], t[rows], condition_rows(cond, rows)
            pad = chunk - len(xs)
            if pad:  # repeat the chunk's first row: a valid input, and its outputs are dropped
                first = [0] * pad
                xs, ts = torch.cat([xs, xs[first]]), torch.cat([ts, ts[first]])
                cs = concat_conditions([cs, condition_rows(cs, first)])  # a tensor or a dict of them
            outs.append(self.net(xs, ts, cs)[: len(xs) - pad])
        return torch.cat(outs)

    def denoise(self, x, sigma, cond=None):
        process = self.info.process
        sig = sigma.detach().cpu().double().numpy()
        alpha = torch.as_tensor(process.alpha(sig), dtype=x.dtype, device=x.device)
        t = torch.as_tensor(process.t(sig), dtype=x.dtype, device=x.device)
        x_t = x * _bcast(alpha, x)
        out = self._net_in_chunks(x_t, t, cond)
        return prediction_to_x0(self.info.prediction, out, x_t, _bcast(alpha, x), _bcast(alpha * sigma, x))


def network_batch(params: dict, default: int) -> int | None:
    """An entry's `params.network_batch`: rows per network call, or 'auto' (None: NetworkDenoiser finds the largest
    that fits on the first call)."""
    value = params.get("network_batch", default)
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"params.network_batch: rows per network call, an integer >= 1 or 'auto'; not {value!r}")
    return value


def prediction_to_x0(prediction: str, out, x_t, alpha, sigma_unscaled):
    """x0 from a network output, given x_t = alpha x0 + sigma eps (sigma here is unscaled)."""
    if prediction == "x0":
        return out
    if prediction == "eps":
        return (x_t - sigma_unscaled * out) / alpha
    if prediction == "v":  # v = alpha eps - sigma x0, for alpha^2 + sigma^2 = 1
        return alpha * x_t - sigma_unscaled * out
    if prediction == "flow":  # rectified flow: v = eps - x0, alpha = 1 - t, sigma = t
        return x_t - sigma_unscaled * out
    raise ValueError(f"prediction type {prediction!r} unknown; valid: x0, eps, v, flow")


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()
