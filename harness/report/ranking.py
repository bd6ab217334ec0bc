"""Methods ranked across models: at each NFE, each model ranks the methods it ran on its quality metric; a
method's entry is its mean rank over those models, with the spread (best and worst rank) and the count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.report.findings import QUALITY_METRICS
from harness.report.layout import higher_is_better


@dataclass(frozen=True)
class RankEntry:
    mean: float
    best: int
    worst: int
    models: list[str]  # the models that ranked it here


@dataclass
class Ranking:
    metrics: dict[str, str]  # model -> the quality metric that ranks its methods
    nfes: list[int]
    methods: list[str]  # ordered by mean rank over every NFE they ranked at
    entries: dict[tuple[str, int], RankEntry]  # (method, nfe)
    field_size: dict[tuple[str, int], int]  # (model, nfe) -> how many methods it ranked there


def rank_methods(results: pd.DataFrame) -> Ranking:
    """results: the long table; only unguided ok rows with finite values rank. Ties share the better rank."""
    unguided = results[(results["guidance"].fillna(1.0) == 1.0) & (results["status"] == "ok")]
    unguided = unguided[np.isfinite(unguided["value"].astype(float))]
    metrics = {}
    for model in sorted(set(unguided["model"])):
        present = set(unguided[unguided["model"] == model]["metric"])
        metric = next((m for m in QUALITY_METRICS if m in present), None)
        if metric is not None:
            metrics[model] = metric
    ranks: dict[tuple[str, int], list[tuple[str, int]]] = {}
    field_size = {}
    for model, metric in metrics.items():
        rows = unguided[(unguided["model"] == model) & (unguided["metric"] == metric)]
        for nfe, at in rows.groupby("nfe"):
            order = at["value"].rank(method="min", ascending=not higher_is_better(metric)).astype(int)
            field_size[(model, int(nfe))] = len(at)
            for method, rank in zip(at["method"], order):
                ranks.setdefault((method, int(nfe)), []).append((model, int(rank)))
    entries = {key: RankEntry(float(np.mean([r for _, r in found])), min(r for _, r in found),
                              max(r for _, r in found), [m for m, _ in found]) for key, found in ranks.items()}
    overall = {}
    for (method, _), entry in entries.items():
        overall.setdefault(method, []).append(entry.mean)
    methods = sorted(overall, key=lambda m: (np.mean(overall[m]), m))
    return Ranking(metrics, sorted({nfe for _, nfe in entries}), methods, entries, field_size)
