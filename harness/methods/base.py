"""The Sampler interface: sample(denoiser, noise, nfe, cond, generator) -> x0.

A Sampler is built from one methods.yaml entry. It maps an NFE budget to its own step count and
rejects budgets it cannot meet exactly (`UnsupportedNFE`), so the grid never reports a cell whose
cost differs from its label.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from harness.errors import ConfigError, UnsupportedNFE, valid_names
from harness.models.base import Denoiser
from harness.noise import SampleNoise


class Sampler(ABC):
    family: str
    # Methods with side data (model statistics, fitted ratios, searched schedules) compute it once
    # in a job of its own and sampling only loads it (harness.prepared): None = nothing to prepare,
    # "model" = one artifact per (model, method), "nfe" = one per (model, method, NFE).
    prepare_scope: str | None = None

    def __init__(self, spec: dict):
        self.spec = spec

    def procedure_and_params(self, procedures: dict) -> tuple[str, dict]:
        """The entry's `procedure` and its `params`, for a family whose methods differ by procedure (student,
        jacobi): `procedures` maps each procedure to the params it takes."""
        procedure = self.spec.get("procedure")
        if procedure not in procedures:
            raise ConfigError(f"key 'procedure': {procedure!r} unknown{valid_names(procedure, procedures)}")
        params = dict(self.spec.get("params") or {})
        unknown = sorted(set(params) - set(procedures[procedure]))
        if unknown:
            raise ConfigError(f"key 'params.{unknown[0]}': unknown for procedure {procedure!r}"
                              f"{valid_names(unknown[0], procedures[procedure])}")
        return procedure, params

    def prepare(self, denoiser: Denoiser, nfe: int | None, calibration_seed: int) -> dict:
        """Compute the side data, drawing calibration noise as SampleNoise(calibration_seed, range(k))
        (disjoint from every cell's noise). Returns a torch.save-able dict."""
        raise NotImplementedError(f"{type(self).__name__} has nothing to prepare")

    def prepare_code(self) -> str:
        """A hash of the code that prepares the side data: part of the artifact's cache key."""
        raise NotImplementedError(f"{type(self).__name__} has nothing to prepare")

    def use_prepared(self, artifact: dict) -> None:
        """Take the side data made by `prepare` before sampling."""
        raise NotImplementedError(f"{type(self).__name__} has nothing to prepare")

    def prepared_summary(self, artifact: dict, nfe: int, model_spec: dict) -> dict | None:
        """What cell.json records of the side data at this budget, for the report (None: nothing)."""
        return None

    def summary(self) -> dict[str, str]:
        """What `stepbench methods` lists for this method, column -> text."""
        return {"family": self.family}

    # Methods that run other models beside the cell's (a stitched small model) name them; the cell loads them
    # (counting their passes, under the cell's guidance) and hands them over.
    def extra_models(self) -> list[str]:
        return []

    def use_models(self, denoisers: dict[str, Denoiser]) -> None:
        """The extra models, loaded."""

    # Methods that transform the cell's network (quantisation) do it here, before it is counted; what they
    # record of the transform goes into cell.json's `method_record`, and metrics only they define are
    # evaluated on their cells beside the model's (`cell_metrics`).
    cell_metrics: tuple[str, ...] = ()

    def model_for(self, denoiser: Denoiser) -> Denoiser:
        """The cell's model as this method runs it (loaded, not yet counted or guided)."""
        return denoiser

    def record(self) -> dict:
        """What cell.json keeps of this method's own work (JSON-able)."""
        return {}

    def denoiser_for(self, denoiser: Denoiser) -> Denoiser:
        """The denoiser this method's sampling calls, built on the cell's (a stitched pair): the NFE audit
        counts the calls to it."""
        return denoiser

    # what the method samples: "denoiser" (a Denoiser), or "flow" (harness.models.flow, by inversion)
    model_kind: str = "denoiser"

    def check_model(self, nfe: int, model_spec: dict) -> None:
        """Raise UnsupportedNFE if this method cannot sample this models.yaml entry at nfe (another model kind;
        a budget the model's structure fixes), from the entry alone: the grid marks such a cell unsupported."""
        from harness.models import model_kind

        kind = model_kind(model_spec)
        if kind != self.model_kind:
            raise UnsupportedNFE(f"family {self.family} samples {self.model_kind} models; this one is a {kind}",
                                 f"{kind} model: {self.family} methods sample {self.model_kind}s")

    @abstractmethod
    def check_nfe(self, nfe: int) -> None:
        """Raise UnsupportedNFE (with the reason and the nearest valid budgets) if nfe cannot be met."""

    @abstractmethod
    def sample(
        self,
        denoiser: Denoiser,
        noise: torch.Tensor,
        nfe: int,
        cond: Any = None,
        generator: SampleNoise | None = None,
    ) -> torch.Tensor:
        """noise: [B, *data_shape] standard normal, paired across methods; returns x0 [B, ...]."""
