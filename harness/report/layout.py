"""What the report shows and in which order: models, their methods, NFE columns and metric tables."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from harness.metrics import METRICS


@dataclass(frozen=True)
class ModelLayout:
    """One section of the page: a model's cells at one guidance scale."""

    model: str
    methods: list[str]  # table rows
    nfes: list[int]  # table columns
    metrics: list[str]  # one table (and one plot) each
    guidance: float = 1.0

    @property
    def name(self) -> str:
        return self.model if self.guidance == 1 else f"{self.model} (guidance {self.guidance:g})"

    def select(self, results: pd.DataFrame) -> pd.DataFrame:
        return results[(results["model"] == self.model) & (results["guidance"].fillna(1.0) == self.guidance)]


def plan_layout(results: pd.DataFrame, models: dict[str, dict], methods: dict[str, dict],
                grid: dict | None) -> list[ModelLayout]:
    """Grid order first, then the order of models.yaml / methods.yaml, then anything else sorted; a model's
    guidance scales in increasing order."""
    grid = grid or {}
    layouts = []
    for model in _ordered(set(results["model"]), [*grid.get("models", []), *models]):
        expected_metrics = models.get(model, {}).get("metrics", [])
        of_model = results[results["model"] == model]
        for scale in sorted(set(of_model["guidance"].fillna(1.0))):
            rows = of_model[of_model["guidance"].fillna(1.0) == scale]
            layouts.append(ModelLayout(
                model=model,
                methods=_ordered(set(rows["method"]), [*grid.get("methods", []), *methods]),
                nfes=sorted(int(nfe) for nfe in rows["nfe"].unique()),
                metrics=_ordered(set(rows["metric"].dropna()) | set(expected_metrics), expected_metrics),
                guidance=float(scale),
            ))
    return layouts


def _ordered(present: set[str], preferred: list[str]) -> list[str]:
    first = list(dict.fromkeys(item for item in preferred if item in present))
    return first + sorted(present - set(first))


def higher_is_better(metric: str) -> bool:
    """The metric class's own direction; metrics the registry does not know count as errors."""
    return metric in METRICS and METRICS.get(metric).higher_is_better


def direction_label(metric: str) -> str:
    label = "higher is better" if higher_is_better(metric) else "lower is better"
    return label if metric in METRICS else f"{label} (assumed: metric not registered)"
