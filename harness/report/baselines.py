"""Methods versus their baselines: does an accelerator beat the solver it builds on, at few NFE?

A methods.yaml entry may name `baseline: <method id>` (its base solver on the same schedule). For each
model the report compares the two on the model's first error metric at every NFE in FEW_NFE where both
have a result, and says plainly when a method does not beat or match its baseline here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from harness.report.layout import higher_is_better

FEW_NFE = range(5, 11)  # "few-step" budgets where the seed papers claim their gains
ERROR_METRICS = ("exact_err", "mse_ref", "fid")  # in order of preference: the most direct first
MATCH_TOLERANCE = 0.01  # within 1 % of the baseline counts as matching it


@dataclass(frozen=True)
class Comparison:
    method: str
    baseline: str
    metric: str
    points: list[tuple[int, float, float]]  # (nfe, method value, baseline value)

    @property
    def wins(self) -> list[int]:
        better = (lambda a, b: a >= b * (1 - MATCH_TOLERANCE)) if higher_is_better(self.metric) \
            else (lambda a, b: a <= b * (1 + MATCH_TOLERANCE))
        return [nfe for nfe, value, base in self.points if better(value, base)]

    @property
    def verdict(self) -> str:
        if not self.points:
            return f"no NFE in {FEW_NFE.start}-{FEW_NFE.stop - 1} where both {self.method} and {self.baseline} ran"
        if self.wins:
            return f"beats or matches {self.baseline} at NFE {', '.join(map(str, self.wins))}"
        return f"does not beat {self.baseline} here (NFE {', '.join(str(p[0]) for p in self.points)})"


def compare_to_baselines(rows: pd.DataFrame, metrics: list[str], methods: dict[str, dict]) -> list[Comparison]:
    """rows: one model's long-format results; metrics: that model's metrics in models.yaml order."""
    metric = next((m for m in ERROR_METRICS if m in metrics and (rows["metric"] == m).any()), None)
    if metric is None:
        return []
    ok = rows[(rows["metric"] == metric) & (rows["status"] == "ok") & rows["value"].notna()]
    values = {(r.method, int(r.nfe)): float(r.value) for r in ok.itertuples()}
    present = set(rows["method"])
    comparisons = []
    for method in sorted(present):
        baseline = methods.get(method, {}).get("baseline")
        if baseline is None or baseline not in present:
            continue
        points = [(nfe, values[method, nfe], values[baseline, nfe]) for nfe in FEW_NFE
                  if (method, nfe) in values and (baseline, nfe) in values
                  and math.isfinite(values[method, nfe]) and math.isfinite(values[baseline, nfe])]
        comparisons.append(Comparison(method, baseline, metric, points))
    return comparisons
