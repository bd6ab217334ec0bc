"""The leaderboard: a results directory (+ grid) -> a static site under OUT.

OUT/index.html (overview), OUT/models/*.html (a page per model), OUT/cells/*.html (a page per cell),
OUT/plots/*.svg and their data OUT/data/*.csv, OUT/thumbs/ (sample grids, audio), OUT/results.csv and
OUT/results.json (the same rows). Nothing is loaded from outside OUT; pages work from file://.
Everything but the generation timestamp in the pages is a function of the inputs, so two runs over the same
results give byte-identical files otherwise.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness.cells import cell_config_hash
from harness.config import load_methods, load_models
from harness.files import write_text
from harness.grid import expand_grid, grid_seeds, load_grid
from harness.report.collect import collect_results
from harness.report.findings import all_findings
from harness.report.layout import plan_layout
from harness.report.plots import write_guidance_plots, write_plots
from harness.report.ranking import rank_methods
from harness.report.significance import Significance
from harness.report.site import render_site
from harness.report.thumbnails import thumbnail_name, write_thumbnails

__all__ = ["collect_results", "render_report"]


def render_report(results_dir: Path, out: Path, grid_file: Path | None, models_file: Path, methods_file: Path) -> None:
    results_dir, out = Path(results_dir), Path(out)
    models, methods = load_models(models_file), load_methods(methods_file)
    grid = load_grid(grid_file) if grid_file else None
    grid_cells = expand_grid(grid, models, methods) if grid else None
    collected = collect_results(results_dir, grid_cells, methods, grid_seeds(grid) if grid else None,
                                expected_hash=lambda cell: _todays_hash(cell, models, methods, grid))
    results = collected.results
    layouts = plan_layout(results, models, methods, grid)

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.csv", results.to_csv(index=False))
    write_text(out / "results.json", _as_json(results))
    if collected.per_seed["seed"].nunique() > 1:  # the aggregated rows hide the seeds: keep them too
        write_text(out / "results_per_seed.csv", collected.per_seed.to_csv(index=False))
    families = {m: s.get("family") for m, s in methods.items()}
    families.update({r.method: r.family for r in results.itertuples() if r.method not in families and r.family})
    plots = write_plots(results, layouts, out / "plots", out / "data", families)
    guidance_plots = write_guidance_plots(results, out / "plots")
    render_site(out, collected, layouts, plots, guidance_plots, _thumbnails(collected, results_dir, out, models),
                all_findings(results, models, methods, collected.prepared), rank_methods(results),
                Significance(collected, methods),
                results_dir=results_dir, grid_file=str(grid_file) if grid_file else None,
                generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), models=models, methods=methods)


def _thumbnails(collected, results_dir: Path, out: Path, models: dict) -> dict:
    """cell_dir -> Thumbnails, for every sampled cell of a seed whose samples are images or audio."""
    cells = collected.per_seed.drop_duplicates("cell_dir")
    cells = cells[cells["cell_dir"].notna() & (cells["status"] == "ok")]
    found = {}
    for row in cells.itertuples():
        thumbs = write_thumbnails(results_dir / row.cell_dir / "samples.npz", out / "thumbs",
                                  thumbnail_name(row.cell_dir), models.get(row.model, {}))
        if thumbs is not None:
            found[row.cell_dir] = thumbs
    # an aggregated cell (several seeds) shows its first seed's samples
    for row in collected.results.drop_duplicates("cell_dir").itertuples():
        if isinstance(row.cell_dir, str) and row.cell_dir not in found:
            first = sorted(d for d in found if d.startswith(row.cell_dir.rstrip("/") + "/"))
            if first:
                found[row.cell_dir] = found[first[0]]
    return found


def _as_json(results: pd.DataFrame) -> str:
    """results.csv's rows as a JSON list of objects (missing values null)."""
    records = json.loads(results.to_json(orient="records"))
    return json.dumps(records, indent=1)


def _todays_hash(cell: dict, models: dict, methods: dict, grid: dict | None) -> str | None:
    """The config hash the cell would have if sampled now (None for a model or method no longer listed)."""
    model, method = models.get(cell["model"]), methods.get(cell["method"])
    if model is None or method is None or cell.get("seed") is None:
        return None
    num_samples = ((grid or {}).get("num_samples") or model.get("num_samples", 1000)) if grid else cell.get("num_samples")
    return cell_config_hash(model, method, int(cell["nfe"]), int(cell["seed"]), int(num_samples),
                            float(cell.get("guidance", 1)))
