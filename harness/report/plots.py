"""Quality vs NFE, one PNG per (model, metric), one line per method."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg is used for PNG
from matplotlib.ticker import NullLocator

from harness.files import atomic_path
from harness.report.layout import ModelLayout, direction_label, higher_is_better

MARKERS = "osD^v<>ph*"


def plot_file_name(model: str, metric: str) -> str:
    safe = [re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in (model, metric)]
    return f"{safe[0]}__{safe[1]}.png"


def write_plots(results: pd.DataFrame, layouts: list[ModelLayout], plots_dir: Path) -> dict[tuple[str, str], str]:
    """Plot every metric that has at least one finite value of an ok cell.

    Returns (model, metric) -> file name inside plots_dir.
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    # One colour and marker per method across all plots, so a method looks the same everywhere.
    all_methods = list(dict.fromkeys(method for layout in layouts for method in layout.methods))
    styles = {method: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, method in enumerate(all_methods)}
    plotted = results[(results["status"] == "ok") & results["value"].notna()]
    written = {}
    for layout in layouts:
        for metric in layout.metrics:
            points = layout.select(plotted)
            points = points[points["metric"] == metric]
            if points.empty:
                continue
            name = plot_file_name(layout.name, metric)
            _plot(points, layout, metric, styles, plots_dir / name)
            written[(layout.name, metric)] = name
    return written


def _plot(points: pd.DataFrame, layout: ModelLayout, metric: str, styles: dict, path: Path) -> None:
    fig = Figure(figsize=(5.5 + (1.6 if len(layout.methods) <= 14 else 3.2), 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for method in layout.methods:
        line = points[points["method"] == method].sort_values("nfe")
        if line.empty:
            continue
        colour, marker = styles[method]
        # clip: an interval over seeds or resamples need not contain the value on both sides
        below = (line["value"] - line["ci_low"]).fillna(0).clip(lower=0)
        above = (line["ci_high"] - line["value"]).fillna(0).clip(lower=0)
        ax.errorbar(line["nfe"].astype(int), line["value"], yerr=[below, above], color=colour, marker=marker,
                    capsize=3, label=method)
    # Errors shrink by orders of magnitude as NFE grows: a log axis shows convergence orders as slopes.
    # Within one decade it only crowds the tick labels.
    values = points["value"]
    if not higher_is_better(metric) and (values > 0).all() and values.max() >= 10 * values.min():
        ax.set_yscale("log")
    # A narrow NFE range on a log axis crowds neighbouring tick labels (20, 21) together.
    nfes = layout.nfes
    ax.set_xscale("log" if nfes[-1] >= 10 * nfes[0] else "linear")
    ax.set_xticks(nfes, [str(nfe) for nfe in nfes], fontsize=8)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(metric)
    ax.set_title(f"{layout.name}: {metric} ({direction_label(metric)})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    # beside the axes, so a long list of methods never hides the lines
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=1 if len(layout.methods) <= 14 else 2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


def write_guidance_plots(results: pd.DataFrame, plots_dir: Path) -> dict[tuple[str, str], str]:
    """For each model with several guidance scales: quality against the scale per metric (one line per method
    and NFE), and the trade-off people read to choose a scale, FID against class_acc over the scales.

    Returns (model, "guidance:<metric>" or "tradeoff") -> file name inside plots_dir.
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    ok = results[(results["status"] == "ok") & results["value"].notna()].copy()
    ok["guidance"] = ok["guidance"].fillna(1.0)
    written = {}
    for model in sorted(set(ok["model"])):
        rows = ok[ok["model"] == model]
        if rows["guidance"].nunique() < 2:
            continue
        lines = rows.groupby(["method", "nfe"])
        for metric in sorted(set(rows["metric"]) - {"wall_s_per_sample", "peak_mem_mb", "gflops_per_sample"}):
            fig, ax = _figure()
            for i, ((method, nfe), line) in enumerate(lines):
                line = line[line["metric"] == metric].sort_values("guidance")
                if len(line) > 1:
                    ax.plot(line["guidance"], line["value"], marker=MARKERS[i % len(MARKERS)], label=f"{method} @ {nfe}")
            if not ax.lines:
                continue
            ax.set_xlabel("guidance scale w")
            ax.set_ylabel(metric)
            ax.set_title(f"{model}: {metric} vs guidance ({direction_label(metric)})", fontsize=10)
            written[(model, f"guidance:{metric}")] = _save(fig, ax, plots_dir / plot_file_name(model, f"guidance-{metric}"))
        if {"fid", "class_acc"} <= set(rows["metric"]):
            fig, ax = _figure()
            for i, ((method, nfe), line) in enumerate(lines):
                table = line.pivot_table(index="guidance", columns="metric", values="value")
                if {"fid", "class_acc"} <= set(table.columns) and len(table) > 1:
                    ax.plot(table["class_acc"], table["fid"], marker=MARKERS[i % len(MARKERS)], label=f"{method} @ {nfe}")
                    for w, point in table.iterrows():
                        ax.annotate(f"w={w:g}", (point["class_acc"], point["fid"]), fontsize=6, alpha=0.7)
            if ax.lines:
                ax.set_xlabel("class_acc (higher: follows its label)")
                ax.set_ylabel("FID (lower: closer to the data)")
                ax.set_title(f"{model}: quality vs adherence over guidance scales", fontsize=10)
                written[(model, "tradeoff")] = _save(fig, ax, plots_dir / plot_file_name(model, "guidance-tradeoff"))
    return written


def _figure():
    fig = Figure(figsize=(7.5, 3.8), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig, ax, path: Path) -> str:
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path.name
