"""The leaderboard as a static site: an overview, a page per model, a page per cell, from Jinja2 templates.

Every text from configs or results reaches the pages through Jinja2 with autoescape on, and script data only
through the `tojson` filter (which escapes <, >, & and ', so `</script>` cannot end a script). Nothing is loaded
from outside the site: CSS and the small sorting/filtering script are inline, images are files beside the
pages. This module only prepares plain data for the templates; it formats numbers, never HTML.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import pandas as pd

from harness.grid import guidance_suffix
from harness.report.baselines import FEW_NFE, MATCH_TOLERANCE, compare_to_baselines
from harness.report.collect import CELL_KEYS, Collected
from harness.report.findings import Finding
from harness.report.layout import ModelLayout, direction_label, higher_is_better
from harness.report.plots import Plot
from harness.report.ranking import Ranking
from harness.report.significance import BETTER, WORSE, Significance
from harness.report.thumbnails import Thumbnails

STATUS_ORDER = ["ok", "diverged", "missing", "damaged", "stale", "unsupported"]
SNAKEMAKE_REPORT = "snakemake-report.html"  # `snakemake --report reports/snakemake-report.html`
TEMPLATES = Path(__file__).with_name("templates")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals["direction_label"] = direction_label
    env.filters["num"] = fmt
    return env


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value is pd.NA:
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text))


def cell_page_name(model: str, method: str, nfe: int, guidance: float) -> str:
    return f"{slug(model)}__{slug(method)}__nfe{int(nfe)}{guidance_suffix(guidance)}.html"


def model_page_name(model: str) -> str:
    return f"{slug(model)}.html"


# --- tables ------------------------------------------------------------------------------------------

@dataclass
class Cell:
    text: str
    classes: list[str]
    sort: str = ""  # what a click on the column header sorts by (a number, or empty: last)
    ci: str = ""
    title: str = ""
    href: str | None = None
    mark: str = ""  # ▲ / ▼: paired-significantly better / worse than the method's baseline
    mark_title: str = ""


@dataclass
class Row:
    method: str
    family: str
    description: str
    cells: list[Cell]


@dataclass
class MetricTable:
    id: str
    model: str
    metric: str
    direction: str
    arrow: str
    nfes: list[int]
    rows: list[Row]
    audit: list[str]
    plots: list[Plot] = field(default_factory=list)
    definition: str = ""  # the metric class's own first docstring line (a tooltip)


def metric_definition(metric: str) -> str:
    from harness.metrics import METRICS

    if metric not in METRICS:
        return "not a registered metric"
    doc = (METRICS.get(metric).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def format_interval(low, high) -> str:
    """Every interval in one format: [low, high]."""
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return ""
    return f"[{low:.4g}, {high:.4g}]"


def metric_table(rows: pd.DataFrame, cells: pd.DataFrame, layout: ModelLayout, metric: str, methods: dict,
                 significance: Significance, plots: list[Plot]) -> MetricTable:
    values = rows[rows["metric"] == metric].set_index(["method", "nfe"])
    measured = cells["nfe_measured"]
    audit = cells[measured.notna() & ((measured - cells.index.get_level_values("nfe")).abs() > 1e-9)]
    higher = higher_is_better(metric)
    best = _supported_best(values, layout, metric, significance)
    table_rows = []
    for method in layout.methods:
        family = methods.get(method, {}).get("family") or _first(cells, method, "family") or ""
        row_cells = []
        for nfe in layout.nfes:
            key = (method, nfe)
            cell = _cell(key, values, cells, layout)
            if key in best:
                cell.classes.append("best")
                cell.title = (cell.title + " best in its column; " + best[key]).strip()
            if key in audit.index:
                cell.classes.append("audit-flag")
                cell.text += " †"
                cell.title = f"{cell.title} measured NFE {audit.loc[key, 'nfe_measured']:g} != requested {nfe}".strip()
            versus = significance.versus_baseline(layout.model, method, nfe, layout.guidance, metric)
            if versus is not None and versus.difference.verdict in (BETTER, WORSE):
                cell.mark = "▲" if versus.difference.verdict == BETTER else "▼"
                cell.classes.append(f"sig-{versus.difference.verdict}")
                cell.mark_title = (f"{versus.difference.verdict} than its baseline {versus.baseline} (paired bootstrap "
                                   f"over samples: {versus.difference.describe()})")
            row_cells.append(cell)
        table_rows.append(Row(method, family, methods.get(method, {}).get("description", ""), row_cells))
    return MetricTable(
        id=slug(f"{layout.name}--{metric}"), model=layout.model, metric=metric, direction=direction_label(metric),
        arrow="↑" if higher else "↓", nfes=layout.nfes, rows=table_rows,
        audit=[f"{method} @ NFE {nfe}: measured {row.nfe_measured:g}" for (method, nfe), row in audit.iterrows()],
        plots=plots, definition=metric_definition(metric))


def _supported_best(values: pd.DataFrame, layout: ModelLayout, metric: str, significance: Significance) -> dict:
    """(method, nfe) -> why: the best of its column, only where the data support it over the runner-up (their
    intervals do not overlap, or the paired bootstrap of their difference excludes 0). A column with one value
    or with a tie, or without intervals, has no best."""
    ranked = values[(values["status"] == "ok") & values["value"].notna()]
    higher = higher_is_better(metric)
    best = {}
    for nfe, column in ranked.groupby(level="nfe"):
        if len(column) < 2:
            continue
        column = column.sort_values("value", ascending=not higher)
        (first, _), (second, _) = column.index[0], column.index[1]
        a, b = column.iloc[0], column.iloc[1]
        if a["value"] == b["value"]:
            continue
        separate = (pd.notna(a["ci_low"]) and pd.notna(b["ci_low"])
                    and ((a["ci_low"] > b["ci_high"]) if higher else (a["ci_high"] < b["ci_low"])))
        if separate:
            best[(first, nfe)] = f"its interval does not overlap the runner-up's ({second})"
            continue
        paired = significance.between(layout.model, first, second, nfe, layout.guidance, metric)
        if paired is not None and paired.verdict == BETTER:
            best[(first, nfe)] = f"paired bootstrap vs the runner-up {second}: {paired.describe()}"
    return best


def _cell(key: tuple[str, int], values: pd.DataFrame, cells: pd.DataFrame, layout: ModelLayout) -> Cell:
    if key not in cells.index:
        return Cell("—", ["not-run"], title="no result for this cell")
    cell = cells.loc[key]
    href = cell_page_name(layout.model, key[0], key[1], layout.guidance) if pd.notna(cell["cell_dir"]) else None
    if cell["status"] == "unsupported":
        return Cell(f"n/a ({cell['reason']})", ["unsupported"])
    if key not in values.index:
        if cell["status"] in ("diverged", "damaged", "stale"):  # damaged or stale cells show no numbers
            return Cell(cell["status"], [cell["status"]], title=cell["reason"], href=href)
        return Cell("missing", ["missing"], title=cell["reason"] or "metric not in metrics.json", href=href)
    row = values.loc[key]
    if pd.isna(row["value"]):
        label = "diverged" if row["status"] == "diverged" else "non-finite"
        return Cell(label, [label], title=row["reason"], href=href)
    text, ci = fmt(float(row["value"])), format_interval(row["ci_low"], row["ci_high"])
    if row["status"] != "ok":  # e.g. the wall time of a diverged cell: shown, never ranked
        return Cell(f"{text} ({row['status']})", [row["status"]], title=row["reason"], href=href)
    return Cell(text, ["value"], sort=repr(float(row["value"])), ci=ci, href=href)


def _first(cells: pd.DataFrame, method: str, column: str):
    found = cells[cells.index.get_level_values("method") == method][column].dropna()
    return found.iloc[0] if len(found) else None


@dataclass
class CostRow:
    method: str
    family: str
    nfe: int
    values: list[str]
    sorts: list[str]
    href: str | None


COST_COLUMNS = [
    ("measured NFE", "network calls per sample, counted"),
    ("network evals", "network passes per sample (a guided call counts twice)"),
    ("wall s/sample", "sampling wall time over the cell's samples"),
    ("GFLOPs/sample", "measured with a FLOP counter"),
    ("prep s", "the prepared artifact's own wall time (fit, statistics, search, calibration), paid once"),
    ("prep evals", "denoiser rows the preparation evaluated"),
    ("amortised s/sample", "(sampling wall + preparation wall) / samples"),
    ("amortised evals/sample", "NFE + preparation evaluations / samples"),
    ("peak MB", "peak memory of the sampling job"),
]


def cost_rows(cells: pd.DataFrame, layout: ModelLayout, methods: dict) -> list[CostRow]:
    out = []
    for (method, nfe), cell in cells.iterrows():
        if cell["status"] == "unsupported" or pd.isna(cell["wall_s"]):
            continue
        samples = float(cell["num_samples"]) if pd.notna(cell["num_samples"]) else math.nan
        prep_s = cell["prep_s"] if pd.notna(cell["prep_s"]) else 0.0
        prep_evals = cell["prep_evals"] if pd.notna(cell["prep_evals"]) else 0.0
        numbers = [cell["nfe_measured"], cell["network_evals"], cell["wall_s"] / samples, cell["gflops_per_sample"],
                   cell["prep_s"], cell["prep_evals"], (cell["wall_s"] + prep_s) / samples,
                   (cell["nfe_measured"] if pd.notna(cell["nfe_measured"]) else nfe) + prep_evals / samples,
                   cell["peak_mem_mb"]]
        numbers = [float(v) if v is not None and pd.notna(v) else math.nan for v in numbers]
        out.append(CostRow(method, methods.get(method, {}).get("family") or (cell["family"] or ""), int(nfe),
                           [fmt(v) for v in numbers], [repr(v) if math.isfinite(v) else "" for v in numbers],
                           cell_page_name(layout.model, method, nfe, layout.guidance)
                           if pd.notna(cell["cell_dir"]) else None))
    order = {m: i for i, m in enumerate(layout.methods)}
    return sorted(out, key=lambda r: (order.get(r.method, len(order)), r.nfe))


# --- the site ----------------------------------------------------------------------------------------

@dataclass
class Section:
    layout: ModelLayout
    tables: list[MetricTable]
    costs: list[CostRow]
    baselines: list[dict]
    samples: list[dict]  # per NFE: {"nfe", "cells": [{method, family, thumbs, href}]}


def baseline_rows(rows: pd.DataFrame, layout: ModelLayout, methods: dict, significance: Significance) -> list[dict]:
    """The versus-baselines verdicts of one section, each point with its paired significance where known."""
    out = []
    for c in compare_to_baselines(rows, layout.metrics, methods):
        points = []
        for nfe, value, base in c.points:
            versus = significance.versus_baseline(layout.model, c.method, nfe, layout.guidance, c.metric)
            points.append({"nfe": nfe, "value": fmt(value), "base": fmt(base),
                           "verdict": versus.difference.verdict if versus else "not paired (no replicates)",
                           "interval": versus.difference.describe() if versus else ""})
        out.append({"method": c.method, "baseline": c.baseline, "metric": c.metric, "wins": bool(c.wins),
                    "verdict": c.verdict, "points": points})
    return out


def render_site(out: Path, collected: Collected, layouts: list[ModelLayout], plots: dict[tuple[str, str], list[Plot]],
                guidance_plots: dict[tuple[str, str], str], thumbs: dict[str, Thumbnails], findings: list[Finding],
                ranking: Ranking, significance: Significance, *, results_dir: Path, grid_file: str | None,
                generated_at: str, models: dict, methods: dict) -> list[Path]:
    """Writes index.html, models/*.html and cells/*.html; returns the pages written."""
    from harness.files import write_text

    env = environment()
    results = collected.results
    footer = _footer(collected, generated_at, results_dir, grid_file)
    families = {m: s.get("family") for m, s in methods.items()}
    sections: dict[str, list[Section]] = {}
    for layout in layouts:
        rows = layout.select(results)
        cells = rows.drop_duplicates(["method", "nfe"]).set_index(["method", "nfe"])
        tables = [metric_table(rows, cells, layout, metric, methods, significance,
                               plots.get((layout.name, metric), [])) for metric in layout.metrics]
        sections.setdefault(layout.model, []).append(Section(
            layout, tables, cost_rows(cells, layout, methods), baseline_rows(rows, layout, methods, significance),
            _samples(cells, layout, thumbs, families)))
    pages = []
    model_nav = [{"model": model, "href": f"models/{model_page_name(model)}"} for model in sections]

    overview = env.get_template("overview.html").render(
        root="", title="stepbench leaderboard", nav=model_nav, footer=footer, glance=_glance(results, layouts),
        totals=_status_counts(results), ranking=ranking, sections=sections, results_dir=str(results_dir),
        findings=findings, few_nfe=f"{FEW_NFE.start}-{FEW_NFE.stop - 1}", tolerance=f"{MATCH_TOLERANCE:.0%}",
        per_seed=(out / "results_per_seed.csv").exists(), models=models,
        hrefs={model: f"models/{model_page_name(model)}" for model in sections},
        any_baselines=any(s.baselines for secs in sections.values() for s in secs))
    write_text(out / "index.html", overview)
    pages.append(out / "index.html")
    for model, model_sections in sections.items():
        page = env.get_template("model.html").render(
            root="../", title=f"{model} · stepbench", nav=[{**n, "href": f"../{n['href']}"} for n in model_nav],
            footer=footer, model=model, description=models.get(model, {}).get("description", ""),
            cost_columns=COST_COLUMNS, page_data=_page_data(model_sections, methods),
            sections=model_sections,
            guidance_plots=[name for (plotted, _), name in sorted(guidance_plots.items()) if plotted == model],
            findings=[f for f in findings if f.model == model],
            provenance=[(metric, collected.metric_provenance[(model, metric)])
                        for metric in dict.fromkeys(m for s in model_sections for m in s.layout.metrics)
                        if (model, metric) in collected.metric_provenance])
        write_text(out / "models" / model_page_name(model), page)
        pages.append(out / "models" / model_page_name(model))
    pages += _cell_pages(env, out, collected, thumbs, footer, model_nav, results_dir, models, methods)
    return pages


def _page_data(sections: list[Section], methods: dict) -> dict:
    """What the page's script reads (through `tojson`): the filter's families and the methods' descriptions."""
    shown = list(dict.fromkeys(m for s in sections for m in s.layout.methods))
    families = sorted({methods.get(m, {}).get("family") or "" for m in shown} - {""})
    families = sorted(set(families) | {r.family for s in sections for t in s.tables for r in t.rows if r.family})
    return {"families": families,
            "descriptions": {m: methods[m].get("description", "") for m in shown if m in methods}}


def _samples(cells: pd.DataFrame, layout: ModelLayout, thumbs: dict[str, Thumbnails], families: dict) -> list[dict]:
    by_nfe = []
    for nfe in layout.nfes:
        found = []
        for method in layout.methods:
            if (method, nfe) not in cells.index:
                continue
            cell = cells.loc[(method, nfe)]
            shown = thumbs.get(cell["cell_dir"]) if pd.notna(cell["cell_dir"]) else None
            if shown is not None:
                found.append({"method": method, "family": families.get(method) or "", "thumbs": shown,
                              "href": cell_page_name(layout.model, method, nfe, layout.guidance)})
        if found:
            by_nfe.append({"nfe": nfe, "cells": found})
    return by_nfe


def _status_counts(results: pd.DataFrame) -> list[tuple[str, int]]:
    counts = results.drop_duplicates(CELL_KEYS)["status"].value_counts()
    statuses = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts.index) - set(STATUS_ORDER))
    return [(s, int(counts[s])) for s in statuses]


def _glance(results: pd.DataFrame, layouts: list[ModelLayout]) -> list[dict]:
    out = []
    for model in dict.fromkeys(layout.model for layout in layouts):
        rows = results[results["model"] == model]
        out.append({"model": model, "href": f"models/{model_page_name(model)}",
                    "methods": rows["method"].nunique(), "nfes": ", ".join(str(n) for n in sorted(set(rows["nfe"]))),
                    "guidance": ", ".join(f"{g:g}" for g in sorted(set(rows["guidance"].fillna(1.0)))),
                    "statuses": _status_counts(rows)})
    return out


def _footer(collected: Collected, generated_at: str, results_dir: Path, grid_file: str | None) -> dict:
    results = collected.results

    def distinct(column):
        return ", ".join(sorted(set(results[column].dropna()))) or "unknown"

    return {"generated_at": generated_at, "results_dir": str(results_dir), "grid_file": grid_file,
            "git": distinct("git"), "device": distinct("device"), "python": ", ".join(collected.python) or "unknown",
            "packages": ", ".join(f"{name} {' / '.join(v)}" for name, v in collected.packages.items()) or "unknown",
            "snakemake_report": SNAKEMAKE_REPORT}


def _cell_pages(env, out: Path, collected: Collected, thumbs: dict, footer: dict, model_nav: list, results_dir: Path,
                models: dict, methods: dict) -> list[Path]:
    """A page per (model, method, NFE, guidance) with a cell on disk: each seed's records, entries and logs."""
    from harness.files import write_text

    per_seed = collected.per_seed[collected.per_seed["cell_dir"].notna()]
    logs = _log_files(results_dir)
    pages = []
    template = env.get_template("cell.html")
    for (model, method, nfe, guidance), group in per_seed.groupby(CELL_KEYS, sort=True, dropna=False):
        seeds = []
        for cell_dir, rows in group.groupby("cell_dir", sort=True):
            directory = results_dir / cell_dir
            first = rows.iloc[0]
            stem = f"{model}__{method}__nfe{int(nfe)}{guidance_suffix(guidance)}__seed{first['seed']}"
            seeds.append({
                "seed": first["seed"], "cell_dir": cell_dir, "status": first["status"], "reason": first["reason"],
                "thumbs": thumbs.get(cell_dir),
                "samples_href": _relative(directory / "samples.npz", out / "cells"),
                "cell_json": _read_pretty(directory / "cell.json"),
                "metrics_json": _read_pretty(directory / "metrics.json"),
                "metrics": [(r.metric, fmt(r.value), format_interval(r.ci_low, r.ci_high))
                            for r in rows.itertuples() if isinstance(r.metric, str)],
                "logs": [(kind, _tail(path)) for kind, path in sorted(logs.get(stem, {}).items())],
            })
        name = cell_page_name(model, method, nfe, guidance)
        page = template.render(
            root="../", title=f"{model} / {method} / NFE {int(nfe)} · stepbench",
            nav=[{**n, "href": f"../{n['href']}"} for n in model_nav], footer=footer, model=model, method=method,
            nfe=int(nfe), guidance=f"{guidance:g}", seeds=seeds, model_href=f"../models/{model_page_name(model)}",
            model_entry=json.dumps(models.get(model), indent=2, default=str),
            method_entry=json.dumps(methods.get(method), indent=2, default=str))
        write_text(out / "cells" / name, page)
        pages.append(out / "cells" / name)
    return pages


def _log_files(results_dir: Path) -> dict[str, dict[str, Path]]:
    """log stem (MODEL__METHOD__nfeN[-wS]__seedS) -> {job kind: path}, from results/logs/<kind>/."""
    found: dict[str, dict[str, Path]] = {}
    logs = results_dir / "logs"
    if logs.is_dir():
        for path in logs.glob("*/*.log"):
            found.setdefault(path.stem, {})[path.parent.name] = path
    return found


def _tail(path: Path, limit: int = 20000) -> str:
    text = path.read_text(errors="replace")
    return text if len(text) <= limit else "…\n" + text[-limit:]


def _read_pretty(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    try:
        return json.dumps(json.loads(text), indent=2)
    except ValueError:
        return text


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(start).resolve())).as_posix()
