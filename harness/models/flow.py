"""The `flow` model kind: normalizing flows sampled by inverting them (TarFlow), not by denoising.

A flow adapter shares the Denoiser's metadata, conditions (sample i's class label from (seed, i)) and decode, so
cells, references and prepared artifacts handle it as they handle a denoiser; what differs is one call,
`invert(z, cond, strategies, ...)`, which maps the prior's noise to samples and returns what it cost (sequential
passes and token evaluations, counted by harness.nfe.PassCounter). harness.nfe.CountingDenoiser audits it: a
flow's NFE is its sequential network passes per sample, its `network_evals` its token evaluations per sample
(one token through one block's transformer; both halves of a guided pass). `denoise` is not defined for a flow:
a solver cannot sample it (the grid marks such cells unsupported, harness.methods.base.Sampler.check_model).

    digits-tarflow:                       # trained by the workflow (harness.training.tarflow)
      adapter: tarflow
      train: {trainer: tarflow, dataset: digits, seed: 0, config: {...}}
    afhq-tarflow:                         # an apple/ml-tarflow checkpoint: a pickled state dict
      adapter: tarflow
      source: /models/afhq_model_8_768_8_8_0.07.pth
      allow_pickle: true                  # read with torch.load(weights_only=True)
      params: {in_channels: 3, img_size: 256, patch_size: 8, channels: 768, num_blocks: 8, layers_per_block: 8,
               num_classes: 0, noise_std: 0.07}

`params.denoise_scale` (default 1, apple's self_denoising_lr) scales TarFlow's final score-based denoising step;
0 leaves it out.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Sequence

import torch

from harness.errors import ConfigError, StepbenchError
from harness.models.base import Denoiser, DenoiserInfo

SAMPLING_KEYS = ("denoise_scale",)  # params that are not the TarFlow's constructor arguments


class NoProcess:
    """A flow has no noise process; provenance records that."""

    kind = "none"

    def describe(self) -> dict:
        return {"kind": "none (normalizing flow)"}


class FlowModel(Denoiser):
    """A flow: `invert` maps standard normal z [B, *data_shape] to samples; the rest is the Denoiser's."""

    @abstractmethod
    def invert(self, z: torch.Tensor, cond=None, strategies: Sequence | None = None, *, ebound: float = 0.0,
               clamp: float | None = None):
        """-> harness.methods.jacobi_inverse.Inversion (samples x and counted cost); strategies per block
        (jacobi_inverse.BlockStrategy, model order), None for the exact sequential inverse."""

    @property
    @abstractmethod
    def budget(self) -> tuple[int, int, int]:
        """(blocks, tokens per block, passes of the final denoising step), as flow_budget of its entry."""

    def denoise(self, x, sigma, cond=None):
        raise StepbenchError("this model is a normalizing flow: sample it by inversion (a jacobi-family method), "
                             "not with a denoiser's solver")


def tarflow_config(spec: dict) -> dict:
    """The TarFlow's constructor arguments of an entry: a trained one's training config (completed from the
    trainer's defaults), else `params`."""
    if "train" in spec:
        from harness.training.tarflow import DIGITS_TARFLOW

        return {**DIGITS_TARFLOW["model"], **(spec["train"].get("config") or {}).get("model", {})}
    return {k: v for k, v in (spec.get("params") or {}).items() if k not in SAMPLING_KEYS}


def flow_budget(spec: dict) -> tuple[int, int, int]:
    """(blocks, tokens per block, passes of the denoising step) of an entry, from its config alone (planning:
    no weights loaded)."""
    from harness.models.tarflow import TarFlowConfig

    cfg = TarFlowConfig.from_dict(tarflow_config(spec), "models.yaml entry params")
    return cfg.num_blocks, cfg.num_tokens, _denoise_passes(cfg, _denoise_scale(spec))


def _denoise_scale(spec: dict) -> float:
    return (spec.get("params") or {}).get("denoise_scale", 1.0)


def _denoise_passes(cfg, denoise_scale: float) -> int:
    """The denoising step runs every block once over all tokens, unless the model has no noise or it is off."""
    return cfg.num_blocks if cfg.noise_std > 0 and denoise_scale > 0 else 0


class TarFlowModel(FlowModel):
    """A TarFlow (harness.models.tarflow) from our save_pretrained folder or an apple/ml-tarflow `.pth`."""

    def __init__(self, flow, device: torch.device, denoise_scale: float = 1.0, dataset: str | None = None):
        self.flow = flow
        self.denoise_scale = float(denoise_scale)
        c = flow.config
        # null_class None: the grid's classifier-free guidance (GuidedDenoiser) refuses a flow; TarFlow's own
        # guidance on (a, b) is jacobi_inverse.Guidance, not yet a grid axis
        self.info = DenoiserInfo(data_shape=flow.data_shape, data_range=(-1.0, 1.0), prediction="flow-inverse",
                                 process=NoProcess(), dtype=next(flow.parameters()).dtype, device=device,
                                 num_classes=c.num_classes, null_class=None,
                                 extra={"kind": "flow", "noise_std": c.noise_std, "dataset": dataset})

    @classmethod
    def check_spec(cls, spec: dict) -> None:
        flow_budget(spec)  # a bad config is one line at planning
        scale = _denoise_scale(spec)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale < 0:
            raise ConfigError(f"key 'params.denoise_scale': a number >= 0, not {scale!r}")
        if "train" in spec:
            return
        source = spec.get("source")
        if source is None:
            raise ConfigError("a tarflow entry needs `source` (a save_pretrained folder or an apple/ml-tarflow .pth) "
                              "or a `train:` section")
        path = Path(source)
        if path.suffix == ".pth" and not spec.get("allow_pickle", False):
            raise ConfigError(f"{path}: apple/ml-tarflow checkpoints are pickled; set allow_pickle: true in the "
                              "models.yaml entry to read it (with torch.load(weights_only=True))")
        if not path.exists():
            raise StepbenchError(f"{path}: no such checkpoint (file or folder)")

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "TarFlowModel":
        from harness.models.tarflow import load_apple_checkpoint, load_pretrained

        cls.check_spec(spec)
        source = Path(spec["source"])
        if source.is_dir():
            flow = load_pretrained(source, device)
        else:
            flow = load_apple_checkpoint(source, tarflow_config(spec), allow_pickle=bool(spec.get("allow_pickle")),
                                         device=device)
        dataset = spec.get("dataset") or spec.get("train", {}).get("dataset")
        return cls(flow, device, _denoise_scale(spec), dataset)

    @property
    def budget(self) -> tuple[int, int, int]:
        return len(self.flow.blocks), self.flow.num_tokens, _denoise_passes(self.flow.config, self.denoise_scale)

    def invert(self, z, cond=None, strategies=None, *, ebound=0.0, clamp=None):
        """The inverse, then TarFlow's denoising step; cost of both counted (the step is one forward pass of
        every block over all tokens: one sequential pass per block; its backward pass is not counted)."""
        from harness.methods import jacobi_inverse as ji

        if strategies is None:
            strategies = [ji.BlockStrategy(num_gs=0)] * len(self.flow.blocks)
        inverse = ji.invert(self.flow, z, cond, strategies, ebound=ebound, clamp=clamp)
        if self.budget[2] == 0:
            return inverse
        step = ji.denoise_step(self.flow, inverse.x, cond, self.denoise_scale)
        cost = dict(inverse.cost)
        for key in ("passes_per_sample", "network_rows_per_sample", "token_evals_per_sample"):
            cost[key] = inverse.cost[key] + step.cost[key]
        cost["denoise_step"] = step.cost
        return ji.Inversion(step.x, cost)

    def flops_call(self, x, sigma=1.0) -> int:
        """The forward map over the batch: every block over all tokens; returns its token evaluations."""
        with torch.no_grad():
            self.flow(x, None)
        blocks, tokens, _ = self.budget
        return len(x) * blocks * tokens


def flow_of(model) -> FlowModel:
    """The flow under wrappers (counting, calibration labels)."""
    while not isinstance(model, FlowModel) and hasattr(model, "inner"):
        model = model.inner
    if not isinstance(model, FlowModel):
        raise StepbenchError("a jacobi-family method samples normalizing flows (adapter tarflow); this model is a "
                             "denoiser")
    return model
