"""The leaderboard: results directory (+ grid) -> OUT/results.csv, OUT/index.html, OUT/plots/*.png.

Everything but the generation timestamp in index.html is a function of the inputs, so two runs over
the same results give byte-identical files otherwise.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from harness.cells import cell_config_hash
from harness.config import load_methods, load_models
from harness.files import write_text
from harness.grid import expand_grid, grid_seeds, load_grid
from harness.report.collect import collect_results
from harness.report.html import render_page
from harness.report.layout import plan_layout
from harness.report.plots import write_guidance_plots, write_plots

__all__ = ["collect_results", "render_report"]


def render_report(results_dir: Path, out: Path, grid_file: Path | None, models_file: Path, methods_file: Path) -> None:
    results_dir, out = Path(results_dir), Path(out)
    models, methods = load_models(models_file), load_methods(methods_file)
    grid = load_grid(grid_file) if grid_file else None
    grid_cells = expand_grid(grid, models, methods) if grid else None
    collected = collect_results(results_dir, grid_cells, methods, grid_seeds(grid) if grid else None,
                                expected_hash=lambda cell: _todays_hash(cell, models, methods, grid))
    layouts = plan_layout(collected.results, models, methods, grid)

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.csv", collected.results.to_csv(index=False))
    if collected.per_seed["seed"].nunique() > 1:  # the aggregated rows hide the seeds: keep them too
        write_text(out / "results_per_seed.csv", collected.per_seed.to_csv(index=False))
    plots = {**write_plots(collected.results, layouts, out / "plots"),
             **write_guidance_plots(collected.results, out / "plots")}
    page = render_page(
        collected, layouts, plots,
        results_dir=str(results_dir), grid_file=str(grid_file) if grid_file else None,
        generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        models=models, methods=methods,
    )
    write_text(out / "index.html", page)


def _todays_hash(cell: dict, models: dict, methods: dict, grid: dict | None) -> str | None:
    """The config hash the cell would have if sampled now (None for a model or method no longer listed)."""
    model, method = models.get(cell["model"]), methods.get(cell["method"])
    if model is None or method is None or cell.get("seed") is None:
        return None
    num_samples = ((grid or {}).get("num_samples") or model.get("num_samples", 1000)) if grid else cell.get("num_samples")
    return cell_config_hash(model, method, int(cell["nfe"]), int(cell["seed"]), int(num_samples),
                            float(cell.get("guidance", 1)))
