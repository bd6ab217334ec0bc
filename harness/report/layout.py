"""What the report shows and in which order: models, their methods, NFE columns and metric tables."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from harness.metrics import METRICS


@dataclass(frozen=True)
class ModelLayout:
    model: str
    methods: list[str]  # table rows
    nfes: list[int]  # table columns
    metrics: list[str]  # one table (and one plot) each


def plan_layout(results: pd.DataFrame, models: dict[str, dict], methods: dict[str, dict],
                grid: dict | None) -> list[ModelLayout]:
    """Grid order first, then the order of models.yaml / methods.yaml, then anything else sorted."""
    grid = grid or {}
    layouts = []
    for model in _ordered(set(results["model"]), [*grid.get("models", []), *models]):
        rows = results[results["model"] == model]
        expected_metrics = models.get(model, {}).get("metrics", [])
        layouts.append(ModelLayout(
            model=model,
            methods=_ordered(set(rows["method"]), [*grid.get("methods", []), *methods]),
            nfes=sorted(int(nfe) for nfe in rows["nfe"].unique()),
            metrics=_ordered(set(rows["metric"].dropna()) | set(expected_metrics), expected_metrics),
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
