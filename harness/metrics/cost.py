"""Cost metrics, read from the cell's own measurements."""

from __future__ import annotations

from harness.metrics.base import EvalContext, Metric, MetricValue


class WallPerSample(Metric):
    name = "wall_s_per_sample"

    def compute(self, ctx: EvalContext) -> MetricValue:
        cell = ctx.cell
        return MetricValue(cell["wall_s"] / cell["num_samples"], provenance={"device": cell["provenance"]["device"]})


class PeakMemory(Metric):
    name = "peak_mem_mb"

    def compute(self, ctx: EvalContext) -> MetricValue:
        cell = ctx.cell
        return MetricValue(cell["peak_mem_mb"], provenance={"kind": cell["provenance"].get("peak_mem_kind")})


class GFLOPsPerSample(Metric):
    """Network FLOPs per sample: the audited calls times the FLOPs of one call measured by FlopCounterMode."""

    name = "gflops_per_sample"

    def compute(self, ctx: EvalContext) -> MetricValue:
        cell = ctx.cell
        return MetricValue(cell["gflops_per_sample"], provenance={"counter": "torch.utils.flop_counter.FlopCounterMode",
                                                                   "calls": cell["nfe_measured"]})
