"""Cells on disk (and the cells a grid asked for) -> one long table, one row per (cell, metric).

A row whose `metric` is NaN describes a whole cell that has no metric values: unsupported by its
method, requested but missing, or sampled but not evaluated. It applies to every metric table of
its model.

A cell run with several seeds becomes one row per metric: the mean over seeds with a Student-t
interval (CONFIDENCE) over them; the rows of each seed are kept in `per_seed`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from harness import integrity
from harness.errors import StepbenchError
from harness.evaluate import RESERVED_KEYS
from harness.files import read_json
from harness.grid import GridCell, parse_guidance_suffix

COLUMNS = [
    "model", "method", "family", "nfe", "guidance", "nfe_measured", "network_evals", "metric", "value", "ci_low", "ci_high",
    "status", "reason", "num_samples", "seed", "n_seeds", "wall_s", "peak_mem_mb", "gflops_per_sample", "prep_s",
    "prep_evals", "config_hash", "device", "git", "cell_dir",
]
CONFIDENCE = 0.95
INT_COLUMNS = ["nfe", "num_samples", "seed", "n_seeds"]
FLOAT_COLUMNS = ["guidance", "nfe_measured", "network_evals", "value", "ci_low", "ci_high", "wall_s", "peak_mem_mb",
                 "gflops_per_sample", "prep_s", "prep_evals"]
SORT_KEYS = ["model", "method", "nfe", "guidance", "metric"]
CELL_KEYS = ["model", "method", "nfe", "guidance"]  # what a cell is, apart from its seed
REQUIRED_CELL_KEYS = ("model", "method", "nfe", "status")

DIVERGED_REASON = "NaN/Inf in samples"


@dataclass
class Collected:
    results: pd.DataFrame  # COLUMNS, sorted by SORT_KEYS; seeds of a cell aggregated
    per_seed: pd.DataFrame = field(default_factory=pd.DataFrame)  # the same, one row per seed
    packages: dict[str, list[str]] = field(default_factory=dict)  # package -> distinct versions seen
    python: list[str] = field(default_factory=list)
    # (model, metric) -> distinct provenance records (JSON) of that metric's values
    metric_provenance: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    # (model, method, nfe, guidance, seed, metric) -> the metric's bootstrap replicates (metrics.json "replicates")
    replicates: dict[tuple, Replicates] = field(default_factory=dict)
    # (model, method) -> {nfe: the summary its cells recorded of their prepared artifact}, where a method gives one
    prepared: dict[tuple[str, str], dict[int, dict]] = field(default_factory=dict)


@dataclass(frozen=True)
class Replicates:
    seed: int | None  # the resample seed: replicates pair across cells with the same seed and sample count
    num_samples: int
    values: np.ndarray


def collect_results(results_dir: Path, grid_cells: list[GridCell] | None, methods: dict[str, dict],
                    seeds: list[int] | None = None,
                    expected_hash: Callable[[dict], str | None] | None = None) -> Collected:
    """`expected_hash(cell)`: the config hash the cell would have under today's entries (None: unknown); a
    cell sampled under other entries is stale and shows no numbers."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise StepbenchError(f"{results_dir}: results directory not found")
    rows: list[dict] = []
    found: dict[tuple[str, str, int, float, int | None], Path] = {}
    packages: dict[str, set[str]] = {}
    pythons: set[str] = set()
    metric_provenance: dict[tuple[str, str], set[str]] = {}
    replicates: dict[tuple, Replicates] = {}
    prepared: dict[tuple[str, str], dict[int, dict]] = {}

    # With a grid, only its cells and seeds: a results directory keeps cells of earlier grids too
    requested = {c.key for c in grid_cells} if grid_cells is not None else None
    # The path is only where a cell happens to live; cell.json says what it is.
    for cell_json in sorted(results_dir.rglob("cell.json")):
        if cell_json.relative_to(results_dir).parts[0] == "damaged":  # set aside by the workflow, not results
            continue
        try:
            cell = read_json(cell_json)
        except StepbenchError as err:  # an unreadable record: the cell it stood for is damaged, not absent
            row = _unreadable_cell_row(cell_json, results_dir, str(err))
            key = (row["model"], row["method"], row["nfe"], row["guidance"], row["seed"])
            if requested is None or (key[:4] in requested and (seeds is None or key[4] in seeds)):
                rows.append(row)
                found[key] = cell_json
            continue
        missing = [key for key in REQUIRED_CELL_KEYS if key not in cell]
        if missing:
            raise StepbenchError(f"{cell_json}: key '{missing[0]}' missing (needs {', '.join(REQUIRED_CELL_KEYS)})")
        key = (cell["model"], cell["method"], int(cell["nfe"]), float(cell.get("guidance", 1)), cell.get("seed"))
        if requested is not None and (key[:4] not in requested or (seeds is not None and key[4] not in seeds)):
            continue
        if key in found:
            raise StepbenchError(f"{cell_json}: {key[0]} / {key[1]} / NFE {key[2]} / guidance {key[3]:g} / seed "
                                 f"{key[4]} also at {found[key]}; keep one cell per (model, method, NFE, guidance, "
                                 "seed)")
        found[key] = cell_json
        summary = (cell.get("prepared") or {}).get("summary")
        if summary is not None and _distrust(cell_json.parent, cell, expected_hash) is None:
            prepared.setdefault((cell["model"], cell["method"]), {})[int(cell["nfe"])] = summary
        provenance = cell.get("provenance", {})
        for name, version in provenance.get("packages", {}).items():
            packages.setdefault(name, set()).add(str(version))
        if provenance.get("python"):
            pythons.add(str(provenance["python"]))

        base = _cell_fields(cell, cell_json.parent.relative_to(results_dir).as_posix())
        metrics_json = cell_json.parent / "metrics.json"
        distrust = _distrust(cell_json.parent, cell, expected_hash)
        if distrust is not None:  # never a number for samples it was not computed from
            rows.append({**base, "status": distrust[0], "reason": distrust[1]})
            continue
        if not metrics_json.is_file():
            status = "missing" if cell["status"] == "ok" else cell["status"]
            rows.append({**base, "status": status, "reason": "not evaluated (no metrics.json)"})
            continue
        metrics = read_json(metrics_json)
        for name, record in (metrics.get("replicates") or {}).items():
            values = np.array([np.nan if v is None else v for v in record.get("values", [])], dtype=np.float64)
            replicates[(*key, name)] = Replicates(record.get("seed"), int(record.get("num_samples", 0)), values)
        for name, value in metrics.items():
            if name in RESERVED_KEYS:
                continue
            if value is not None and not isinstance(value, (int, float)):
                raise StepbenchError(f"{metrics_json}: key '{name}': {value!r} is not a number or null")
            ci_low, ci_high = metrics.get("ci", {}).get(name, (None, None))
            rows.append({**base, "metric": name, "value": value, "ci_low": ci_low, "ci_high": ci_high,
                         "status": cell["status"], "reason": _value_reason(cell["status"], value)})
            if name in metrics.get("provenance", {}):
                record = json.dumps(metrics["provenance"][name], sort_keys=True, default=str)
                metric_provenance.setdefault((cell["model"], name), set()).add(record)

    found_cells = {key[:4] for key in found}
    for grid_cell in grid_cells or []:
        if grid_cell.key in found_cells:
            continue
        rows.append(_requested_row(grid_cell, methods, results_dir, (seeds or [0])[0]))

    per_seed = _as_table(rows)
    return Collected(
        results=_aggregate_seeds(per_seed),
        per_seed=per_seed,
        packages={name: sorted(versions) for name, versions in sorted(packages.items())},
        python=sorted(pythons),
        metric_provenance={key: sorted(records) for key, records in sorted(metric_provenance.items())},
        replicates=replicates,
        prepared=prepared,
    )


def _distrust(cell_dir: Path, cell: dict, expected_hash) -> tuple[str, str] | None:
    """(status, reason) when the cell's numbers cannot be shown: its samples damaged, its metrics computed from
    other samples, or its entries edited since it was sampled."""
    damage = integrity.cell_damage(cell_dir)
    if damage is not None:
        return "damaged", damage
    stale = integrity.metrics_staleness(cell_dir)
    if stale is not None:
        return stale
    expected = expected_hash(cell) if expected_hash is not None else None
    if expected is not None and expected != cell.get("provenance", {}).get("config_hash"):
        return "stale", "sampled under other models.yaml/methods.yaml entries or sample count than today's"
    return None


def _unreadable_cell_row(cell_json: Path, results_dir: Path, reason: str) -> dict:
    """A damaged row for a cell.json that cannot be read, named by its place (cells/MODEL/METHOD/nfeN[-wS]/seedS)."""
    parts = cell_json.parent.relative_to(results_dir).parts
    if len(parts) != 5 or parts[0] != "cells" or not parts[3].startswith("nfe") or not parts[4].startswith("seed"):
        raise StepbenchError(reason)
    nfe, _, scale = parts[3][3:].partition("-")
    return {"model": parts[1], "method": parts[2], "nfe": int(nfe), "seed": int(parts[4][4:]),
            "guidance": parse_guidance_suffix(f"-{scale}" if scale else ""),
            "status": "damaged", "reason": reason, "cell_dir": "/".join(parts)}


def _cell_fields(cell: dict, cell_dir: str) -> dict:
    provenance = cell.get("provenance", {})
    prepared = cell.get("prepared") or {}  # a prepared artifact's own cost, paid once per (model, method, params)
    return {
        "prep_s": prepared.get("wall_s"),
        "prep_evals": prepared.get("denoiser_rows"),
        "guidance": float(cell.get("guidance", 1)),
        **{key: cell.get(key) for key in ("model", "method", "family", "nfe", "nfe_measured", "network_evals",
                                          "num_samples", "seed", "wall_s", "peak_mem_mb", "gflops_per_sample")},
        "config_hash": provenance.get("config_hash"),
        "device": provenance.get("device"),
        "git": provenance.get("git"),
        "cell_dir": cell_dir,
    }


def _value_reason(status: str, value: float | None) -> str:
    if status == "diverged":
        return DIVERGED_REASON
    if value is None:
        return "metric value not finite"
    return ""


def _requested_row(grid_cell: GridCell, methods: dict[str, dict], results_dir: Path, seed: int) -> dict:
    row = {"model": grid_cell.model, "method": grid_cell.method, "nfe": grid_cell.nfe, "guidance": grid_cell.guidance,
           "family": methods.get(grid_cell.method, {}).get("family")}
    if not grid_cell.supported:
        return {**row, "status": "unsupported", "reason": grid_cell.reason}
    return {**row, "status": "missing", "reason": f"no cell.json under {grid_cell.path(results_dir, seed)}"}


def _aggregate_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, NFE, metric): the seeds' mean and t-interval when all are ok."""
    from scipy import stats

    keys = [*CELL_KEYS, "metric"]
    counts = per_seed.groupby(keys, dropna=False, sort=False)["status"].transform("size")
    single = per_seed[counts == 1].assign(n_seeds=lambda t: t["seed"].notna().astype("Int64"))
    merged = []
    for _, group in per_seed[counts > 1].groupby(keys, dropna=False, sort=False):
        row = group.iloc[0].to_dict()
        row.update(seed=pd.NA, n_seeds=len(group), cell_dir=_common_prefix(group["cell_dir"]),
                   wall_s=group["wall_s"].mean(), peak_mem_mb=group["peak_mem_mb"].max())
        failed = group[group["status"] != "ok"]
        if len(failed):  # one bad seed makes the cell's value undefined, and says why
            row.update(value=float("nan"), ci_low=float("nan"), ci_high=float("nan"),
                       status=failed.iloc[0]["status"], reason=f"{len(failed)} of {len(group)} seeds: "
                       + failed.iloc[0]["reason"])
        else:
            values = group["value"].astype(float)
            half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * values.std(ddof=1) / len(values) ** 0.5
            row.update(value=values.mean(), ci_low=values.mean() - half, ci_high=values.mean() + half)
        merged.append(row)
    table = pd.concat([single, pd.DataFrame(merged, columns=COLUMNS)], ignore_index=True) if merged else single
    return _as_table(table.to_dict("records"))


def _common_prefix(paths: pd.Series) -> str:
    """The cell's directory above its seed folders."""
    parts = [p.split("/") for p in paths.dropna()]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return "/".join(common)


def _as_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in INT_COLUMNS:
        table[column] = pd.array(table[column], dtype="Int64")
    for column in FLOAT_COLUMNS:
        table[column] = pd.to_numeric(table[column]).astype(float)
    table["reason"] = table["reason"].fillna("")
    return table.sort_values(SORT_KEYS, na_position="first", kind="stable").reset_index(drop=True)
