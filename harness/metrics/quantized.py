"""Metrics of a quantised cell (family quantized), evaluated on its cells only (Sampler.cell_metrics).

- mse_fp32: mean squared error per dimension against the full-precision twin: the cell of the base solver at the
  same model, NFE, guidance and seed, which starts from the same noise (paired noise). Its samples are read from
  the twin's cell folder beside this one (cells/MODEL/BASE/nfeN[-wS]/seedS), checked intact and checked to be
  the base entry's cell with the same seed and sample count. Latent models compare latents, as mse_ref does.
- model_bytes: bytes of the network the cell ran (int8 weights, scales, zero points, fp32 rest; a simulated
  scheme's nominal packed size), from the cell's quantization record.
- int8_kernels: oneDNN int8 kernel calls in the compiled graph's generated code (0: no int8 kernel ran).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.errors import StepbenchError
from harness.metrics.base import EvalContext, Metric, MetricValue
from harness.metrics.reference import _per_sample_sq_err


def twin_dir(cell_dir: Path, base: str) -> Path:
    """The fp32 twin's folder: the same model, NFE (guidance suffix) and seed, the base method's."""
    cell_dir = Path(cell_dir)
    return cell_dir.parents[2] / base / cell_dir.parent.name / cell_dir.name


def _record(ctx: EvalContext) -> dict:
    record = (ctx.cell.get("method_record") or {}).get("quantization")
    if not record:
        raise StepbenchError(f"{ctx.cell_dir}: not a quantised cell (cell.json has no method_record.quantization)")
    return record


class MSEToFullPrecision(Metric):
    name = "mse_fp32"

    def compute(self, ctx: EvalContext) -> MetricValue:
        from harness.evaluate import read_samples
        from harness.integrity import verified_cell

        spec = ctx.cell["provenance"]["method_spec"]
        base = spec["quantized"]["base"]
        folder = twin_dir(ctx.cell_dir, base)
        if not (folder / "cell.json").exists():
            raise StepbenchError(f"mse_fp32: the full-precision twin {folder} is missing (sample {base} at the same "
                                 f"NFE and seed first)")
        twin = verified_cell(folder)
        for key in ("model", "nfe", "seed", "num_samples", "guidance"):
            if twin.get(key) != ctx.cell.get(key):
                raise StepbenchError(f"mse_fp32: twin {folder} has {key}={twin.get(key)!r}, this cell "
                                     f"{ctx.cell.get(key)!r}")
        if twin["provenance"]["method_spec"] != spec["base_spec"]:
            raise StepbenchError(f"mse_fp32: twin {folder} was sampled under another {base!r} entry than this "
                                 f"cell's base; sample it again")
        samples, latents, _ = read_samples(folder / "samples.npz")
        ours, theirs = (ctx.samples, samples) if ctx.latents is None else (ctx.latents, latents)
        dims = int(np.prod(ours.shape[1:]))
        value = float(_per_sample_sq_err(ours, theirs).mean() / dims)
        return MetricValue(value, provenance={"twin": str(folder), "twin_samples_sha256": twin["samples_sha256"],
                                              "space": "data" if ctx.latents is None else "latent"})


class ModelBytes(Metric):
    name = "model_bytes"

    def compute(self, ctx: EvalContext) -> MetricValue:
        record = _record(ctx)
        return MetricValue(float(record["size_bytes"]), provenance={"note": record.get("size_note"),
                                                                    "fp32_size_bytes": record.get("fp32_size_bytes")})


class Int8Kernels(Metric):
    name = "int8_kernels"
    higher_is_better = True

    def compute(self, ctx: EvalContext) -> MetricValue:
        record = _record(ctx)
        return MetricValue(float(record["int8_kernels"]), provenance={"precision": record.get("precision")})
