"""Metric interface: compute(ctx) -> MetricValue, with provenance attached to every number."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass
class MetricValue:
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    # the bootstrap's replicates over resample_indices(num_samples, spec): paired across the methods of a model
    replicates: np.ndarray | None = None
    bootstrap_seed: int | None = None


@dataclass
class EvalContext:
    """Everything a metric may look at for one cell; `memo` shares work (e.g. features) between
    metrics evaluated together."""

    cell_dir: Path
    cell: dict  # cell.json
    samples: np.ndarray  # [S, *data_shape] float32, model data space
    model_spec: dict
    methods: dict[str, dict]  # methods.yaml (reference solutions name a method)
    cache_dir: Path
    device: str = "cpu"
    latents: np.ndarray | None = None  # latent models: [S, *latent_shape] float32, the samples before decode
    labels: np.ndarray | None = None  # class-conditional models: int64 [S], the label each sample was drawn for
    prompt_index: np.ndarray | None = None  # text-conditional models: int64 [S], each sample's caption (its index)
    _memo: dict = field(default_factory=dict)

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


class Metric(ABC):
    name: str
    higher_is_better: bool = False

    @abstractmethod
    def compute(self, ctx: EvalContext) -> MetricValue: ...
