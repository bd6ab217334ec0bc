"""Quality against cost, one SVG (and its data as CSV) per (model section, metric, cost axis), with the Pareto
front drawn and the methods on it named.

Readable with 30 methods: one colour per method (the same in every plot), one marker per family, the legend
outside the axes, the front's points labelled directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # no pyplot: no global backend state
from matplotlib.ticker import NullLocator

from harness.files import atomic_path, write_text
from harness.report.findings import QUALITY_METRICS
from harness.report.layout import ModelLayout, direction_label, higher_is_better

FAMILY_MARKERS = {"solver": "o", "student": "s", "quantized": "D", "stitch": "^", "jacobi": "v"}
SPARE_MARKERS = "P*Xh<>p"
LINESTYLES = ["-", "--", ":", "-."]
COST_METRICS = ("wall_s_per_sample", "peak_mem_mb", "gflops_per_sample")  # plotted against NFE only
AXES = {  # cost axis -> (label, how a row's x is computed)
    "nfe": "NFE (network evaluations per sample)",
    "wall": "wall s per sample (preparation amortised over the cell's samples)",
    "gflops": "GFLOPs per sample (measured)",
}
# deterministic SVG ids, no date: the same results give the same files
SVG_RC = {"svg.hashsalt": "stepbench", "svg.fonttype": "none"}


@dataclass
class Plot:
    axis: str  # a key of AXES
    svg: str  # file name inside plots/
    csv: str  # file name inside data/
    title: str
    front: list[str] = field(default_factory=list)  # "method @ NFE" on the Pareto front, cheapest first


def plot_file_name(model: str, metric: str, axis: str = "nfe", suffix: str = ".svg") -> str:
    safe = [re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in (model, metric)]
    return f"{safe[0]}__{safe[1]}__{axis}{suffix}"


def method_styles(methods_in_order: list[str], families: dict[str, str]) -> dict[str, tuple[str, str, str]]:
    """method -> (colour, marker, linestyle): 20 colours, then the next line style; the marker says the family."""
    spare = iter(SPARE_MARKERS * 4)
    markers = dict(FAMILY_MARKERS)
    styles = {}
    for i, method in enumerate(methods_in_order):
        family = families.get(method) or "?"
        if family not in markers:
            markers[family] = next(spare)
        styles[method] = (matplotlib.colormaps["tab20"](i % 20), markers[family], LINESTYLES[(i // 20) % 4])
    return styles


def pareto_front(x: np.ndarray, y: np.ndarray, higher: bool) -> np.ndarray:
    """Indices of the points no other point beats on both: cheaper (or as cheap) and better."""
    score = -y if higher else y
    order = np.lexsort((score, x))
    front, best = [], np.inf
    for i in order:
        if score[i] < best:
            front.append(i)
            best = score[i]
    return np.array(front, dtype=int)


def cost_x(rows: pd.DataFrame, axis: str) -> pd.Series:
    if axis == "nfe":
        return rows["nfe"].astype(float)
    if axis == "wall":
        return (rows["wall_s"] + rows["prep_s"].fillna(0.0)) / rows["num_samples"].astype(float)
    return rows["gflops_per_sample"]


def write_plots(results: pd.DataFrame, layouts: list[ModelLayout], plots_dir: Path, data_dir: Path,
                families: dict[str, str]) -> dict[tuple[str, str], list[Plot]]:
    """(layout name, metric) -> its plots: against NFE always; quality metrics also against wall time and, where
    measured, GFLOPs. Only ok cells with finite values are points."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    all_methods = list(dict.fromkeys(method for layout in layouts for method in layout.methods))
    styles = method_styles(all_methods, families)
    plotted = results[(results["status"] == "ok") & results["value"].notna()]
    written: dict[tuple[str, str], list[Plot]] = {}
    for layout in layouts:
        rows = layout.select(plotted)
        for metric in layout.metrics:
            points = rows[rows["metric"] == metric]
            if points.empty:
                continue
            # quality metrics against every cost; the rest (IS, class_acc, costs themselves) against NFE
            axes = ["nfe", "wall", "gflops"] if metric in QUALITY_METRICS else ["nfe"]
            for axis in axes:
                x = cost_x(points, axis)
                keep = np.isfinite(x.astype(float)) & (x > 0)
                if not keep.any():
                    continue
                plot = _plot(points[keep].assign(x=x[keep]), layout, metric, axis, styles, families, plots_dir,
                             data_dir)
                written.setdefault((layout.name, metric), []).append(plot)
    return written


def _plot(points: pd.DataFrame, layout: ModelLayout, metric: str, axis: str, styles: dict, families: dict,
          plots_dir: Path, data_dir: Path) -> Plot:
    higher = higher_is_better(metric)
    values = points["value"].astype(float).to_numpy()
    front = pareto_front(points["x"].to_numpy(float), values, higher)
    log_y = not higher and (values > 0).all() and values.max() >= 10 * values.min()
    xs = points["x"].to_numpy(float)
    log_x = xs.max() >= 10 * xs.min()
    n_methods = points["method"].nunique()
    with matplotlib.rc_context(SVG_RC):
        legend_width = 2.0 if n_methods <= 16 else 3.6  # inches beside the axes (a fixed layout: constrained
        fig = Figure(figsize=(6.2 + legend_width, 4.0))  # layout costs more than the drawing)
        fig.subplots_adjust(left=0.65 / fig.get_figwidth(), right=1 - (legend_width + 0.15) / fig.get_figwidth(),
                            bottom=0.13, top=0.92)
        ax = fig.add_subplot()
        for method in layout.methods:
            line = points[points["method"] == method].sort_values("x")
            if line.empty:
                continue
            colour, marker, linestyle = styles[method]
            below = (line["value"] - line["ci_low"]).fillna(0).clip(lower=0)
            above = (line["ci_high"] - line["value"]).fillna(0).clip(lower=0)
            if log_y:  # an interval reaching 0 or below has no place on a log axis: its lower arm is left out
                below = below.where(line["ci_low"] > 0, 0.0)
            ax.errorbar(line["x"], line["value"], yerr=[below, above], color=colour, marker=marker, ls=linestyle,
                        markersize=5, capsize=2, lw=1.2, label=method)
        front_rows = points.iloc[front]
        ax.plot(front_rows["x"], front_rows["value"], color="black", lw=2.2, alpha=0.35, zorder=0,
                drawstyle="steps-post", label="Pareto front")
        for _, row in front_rows.iterrows():
            ax.annotate(row["method"] if axis == "nfe" else f"{row['method']} @ {int(row['nfe'])}",
                        (row["x"], row["value"]), xytext=(4, 4), textcoords="offset points", fontsize=7)
        if log_y:
            ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
        if axis == "nfe":
            nfes = sorted(set(int(n) for n in points["nfe"]))
            ax.set_xticks(nfes, [str(n) for n in nfes], fontsize=8)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel(metric)
        title = f"{layout.name}: {metric} ({direction_label(metric)})"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n_methods <= 16 else 2,
                  frameon=False)
        svg = plot_file_name(layout.name, metric, axis)
        with atomic_path(plots_dir / svg) as tmp:
            fig.savefig(tmp, format="svg", metadata={"Date": None, "Creator": None})
    on_front = np.zeros(len(points), dtype=bool)
    on_front[front] = True
    data = points.assign(on_front=on_front, family=points["method"].map(families))[
        ["method", "family", "nfe", "guidance", "x", "value", "ci_low", "ci_high", "on_front"]]
    csv = plot_file_name(layout.name, metric, axis, ".csv")
    write_text(data_dir / csv, data.rename(columns={"x": axis, "value": metric}).to_csv(index=False))
    return Plot(axis, svg, csv, title, [f"{r.method} @ NFE {int(r.nfe)}" for r in front_rows.itertuples()])


def write_guidance_plots(results: pd.DataFrame, plots_dir: Path) -> dict[tuple[str, str], str]:
    """For each model with several guidance scales: quality against the scale per metric (one line per method
    and NFE), and the trade-off people read to choose a scale, FID against class_acc over the scales.

    Returns (model, "guidance:<metric>" or "tradeoff") -> SVG file name inside plots_dir.
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
        styles = [(matplotlib.colormaps["tab20"](i % 20), SPARE_MARKERS[i % len(SPARE_MARKERS)])
                  for i in range(len(lines))]
        for metric in sorted(set(rows["metric"]) - set(COST_METRICS)):
            with matplotlib.rc_context(SVG_RC):
                fig, ax = _figure()
                for (colour, marker), ((method, nfe), line) in zip(styles, lines):
                    line = line[line["metric"] == metric].sort_values("guidance")
                    if len(line) > 1:
                        ax.plot(line["guidance"], line["value"], color=colour, marker=marker, label=f"{method} @ {nfe}")
                if not ax.lines:
                    continue
                ax.set_xlabel("guidance scale w")
                ax.set_ylabel(metric)
                ax.set_title(f"{model}: {metric} vs guidance ({direction_label(metric)})", fontsize=10)
                written[(model, f"guidance:{metric}")] = _save(fig, ax, plots_dir / plot_file_name(model, metric,
                                                                                                    "guidance"))
        if {"fid", "class_acc"} <= set(rows["metric"]):
            with matplotlib.rc_context(SVG_RC):
                fig, ax = _figure()
                for (colour, marker), ((method, nfe), line) in zip(styles, lines):
                    table = line.pivot_table(index="guidance", columns="metric", values="value")
                    if {"fid", "class_acc"} <= set(table.columns) and len(table) > 1:
                        ax.plot(table["class_acc"], table["fid"], color=colour, marker=marker, label=f"{method} @ {nfe}")
                        for w, point in table.iterrows():
                            ax.annotate(f"w={w:g}", (point["class_acc"], point["fid"]), fontsize=6, alpha=0.7)
                if ax.lines:
                    ax.set_xlabel("class_acc (higher: follows its label)")
                    ax.set_ylabel("FID (lower: closer to the data)")
                    ax.set_title(f"{model}: quality vs adherence over guidance scales", fontsize=10)
                    written[(model, "tradeoff")] = _save(fig, ax, plots_dir / plot_file_name(model, "tradeoff",
                                                                                            "guidance"))
    return written


def _figure():
    fig = Figure(figsize=(8.0, 4.0), layout="constrained")
    return fig, fig.add_subplot()


def _save(fig, ax, path: Path) -> str:
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              ncol=1 if len(ax.lines) <= 16 else 2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="svg", metadata={"Date": None, "Creator": None})
    return path.name
