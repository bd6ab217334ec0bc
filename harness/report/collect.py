"""Cells on disk (and the cells a grid asked for) -> one long table, one row per (cell, metric).

A row whose `metric` is NaN describes a whole cell that has no metric values: unsupported by its
method, requested but missing, or sampled but not evaluated. It applies to every metric table of
its model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.errors import StepbenchError
from harness.evaluate import RESERVED_KEYS
from harness.grid import GridCell

COLUMNS = [
    "model", "method", "family", "nfe", "nfe_measured", "network_evals", "metric", "value", "ci_low", "ci_high",
    "status", "reason", "num_samples", "seed", "wall_s", "peak_mem_mb", "config_hash", "device", "git", "cell_dir",
]
INT_COLUMNS = ["nfe", "num_samples", "seed"]
FLOAT_COLUMNS = ["nfe_measured", "network_evals", "value", "ci_low", "ci_high", "wall_s", "peak_mem_mb"]
SORT_KEYS = ["model", "method", "nfe", "metric"]
REQUIRED_CELL_KEYS = ("model", "method", "nfe", "status")

DIVERGED_REASON = "NaN/Inf in samples"


@dataclass
class Collected:
    results: pd.DataFrame  # COLUMNS, sorted by SORT_KEYS
    packages: dict[str, list[str]] = field(default_factory=dict)  # package -> distinct versions seen
    python: list[str] = field(default_factory=list)
    # (model, metric) -> distinct provenance records (JSON) of that metric's values
    metric_provenance: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def collect_results(results_dir: Path, grid_cells: list[GridCell] | None, methods: dict[str, dict]) -> Collected:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise StepbenchError(f"{results_dir}: results directory not found")
    rows: list[dict] = []
    found: dict[tuple[str, str, int], Path] = {}
    packages: dict[str, set[str]] = {}
    pythons: set[str] = set()
    metric_provenance: dict[tuple[str, str], set[str]] = {}

    # The path is only where a cell happens to live; cell.json says what it is.
    for cell_json in sorted(results_dir.rglob("cell.json")):
        cell = _read_json(cell_json)
        missing = [key for key in REQUIRED_CELL_KEYS if key not in cell]
        if missing:
            raise StepbenchError(f"{cell_json}: key '{missing[0]}' missing (needs {', '.join(REQUIRED_CELL_KEYS)})")
        key = (cell["model"], cell["method"], int(cell["nfe"]))
        if key in found:
            raise StepbenchError(f"{cell_json}: {key[0]} / {key[1]} / NFE {key[2]} also at {found[key]}; "
                                 "keep one cell per (model, method, NFE)")
        found[key] = cell_json
        provenance = cell.get("provenance", {})
        for name, version in provenance.get("packages", {}).items():
            packages.setdefault(name, set()).add(str(version))
        if provenance.get("python"):
            pythons.add(str(provenance["python"]))

        base = _cell_fields(cell, cell_json.parent.relative_to(results_dir).as_posix())
        metrics_json = cell_json.parent / "metrics.json"
        if not metrics_json.is_file():
            status = "missing" if cell["status"] == "ok" else cell["status"]
            rows.append({**base, "status": status, "reason": "not evaluated (no metrics.json)"})
            continue
        metrics = _read_json(metrics_json)
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

    for grid_cell in grid_cells or []:
        if (grid_cell.model, grid_cell.method, grid_cell.nfe) in found:
            continue
        rows.append(_requested_row(grid_cell, methods, results_dir))

    return Collected(
        results=_as_table(rows),
        packages={name: sorted(versions) for name, versions in sorted(packages.items())},
        python=sorted(pythons),
        metric_provenance={key: sorted(records) for key, records in sorted(metric_provenance.items())},
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StepbenchError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise StepbenchError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _cell_fields(cell: dict, cell_dir: str) -> dict:
    provenance = cell.get("provenance", {})
    return {
        **{key: cell.get(key) for key in ("model", "method", "family", "nfe", "nfe_measured", "network_evals",
                                          "num_samples", "seed", "wall_s", "peak_mem_mb")},
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


def _requested_row(grid_cell: GridCell, methods: dict[str, dict], results_dir: Path) -> dict:
    row = {"model": grid_cell.model, "method": grid_cell.method, "nfe": grid_cell.nfe,
           "family": methods.get(grid_cell.method, {}).get("family")}
    if not grid_cell.supported:
        return {**row, "status": "unsupported", "reason": grid_cell.reason}
    return {**row, "status": "missing", "reason": f"no cell.json under {grid_cell.path(results_dir)}"}


def _as_table(rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in INT_COLUMNS:
        table[column] = pd.array(table[column], dtype="Int64")
    for column in FLOAT_COLUMNS:
        table[column] = pd.to_numeric(table[column]).astype(float)
    table["reason"] = table["reason"].fillna("")
    return table.sort_values(SORT_KEYS, na_position="first", kind="stable").reset_index(drop=True)
