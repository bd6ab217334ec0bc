"""The leaderboard page: one static HTML file (inline CSS, no scripts) with the plots linked beside it."""

from __future__ import annotations

import math
from html import escape

import pandas as pd

from harness.report.baselines import FEW_NFE, MATCH_TOLERANCE, compare_to_baselines
from harness.report.collect import Collected
from harness.report.findings import Finding, all_findings
from harness.report.layout import ModelLayout, direction_label, higher_is_better

STATUS_ORDER = ["ok", "diverged", "missing", "damaged", "stale", "unsupported"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; margin-top: 2em; }
h3 { margin-bottom: 0.3em; } h3 .direction { font-weight: normal; font-size: 0.8em; color: #666; }
.meta, .description { color: #555; }
p.verdict { font-weight: bold; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
table.kv th { text-align: left; background: #f5f5f5; vertical-align: top; }
table.board td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.board th.method { text-align: left; white-space: nowrap; }
table.baselines td { text-align: left; white-space: normal; }
table.board th.method .family { font-weight: normal; color: #888; font-size: 0.85em; }
table.board thead th { background: #f5f5f5; }
td.best { background: #d9f2d9; font-weight: bold; }
table.board td.unsupported { color: #888; font-size: 0.8em; text-align: left; white-space: normal; max-width: 16em; }
td.diverged { color: #b00020; }
td.missing, td.not-run { color: #999; }
td.damaged, td.stale { color: #b36b00; }
td.audit-flag { outline: 2px dashed #e69500; outline-offset: -3px; }
tr.audit td { text-align: left; background: #fff6e0; font-size: 0.85em; }
.ci { color: #666; font-size: 0.85em; font-weight: normal; }
.metric { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; margin-bottom: 1.5em; }
.metric img { max-width: 550px; border: 1px solid #eee; }
details pre { white-space: pre-wrap; font-size: 0.8em; background: #f8f8f8; padding: 0.4em; }
""".strip()


def render_page(collected: Collected, layouts: list[ModelLayout], plots: dict[tuple[str, str], str], *,
                results_dir: str, grid_file: str | None, generated_at: str, models: dict[str, dict],
                methods: dict[str, dict]) -> str:
    results = collected.results
    body = [
        "<h1>stepbench leaderboard</h1>",
        f'<p class="meta">Generated <time datetime="{escape(generated_at)}">{escape(generated_at)}</time> from '
        f"<code>{escape(results_dir)}</code>"
        + (f", grid <code>{escape(grid_file)}</code>" if grid_file else "")
        + ' &middot; long-format data: <a href="results.csv">results.csv</a></p>',
        _provenance_section(collected),
    ]
    if layouts:
        links = " &middot; ".join(f'<a href="#{_anchor(layout.name)}">{escape(layout.name)}</a>'
                                  for layout in layouts)
        body.append(f"<nav><p>Models: {links}</p></nav>")
    else:
        body.append(f"<p>No cells found under <code>{escape(results_dir)}</code>.</p>")
    findings = all_findings(results, models, methods, collected.prepared)
    body.extend(_finding(f) for f in findings if f.model is None)
    for layout in layouts:
        body.append(_model_section(layout.select(results), layout, plots, models, methods,
                                   collected.metric_provenance, findings))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<title>stepbench leaderboard</title>\n"
            f"<style>\n{STYLE}\n</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _provenance_section(collected: Collected) -> str:
    results = collected.results
    cells = results.drop_duplicates(["model", "method", "nfe"])
    counts = cells["status"].value_counts()
    statuses = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts.index) - set(STATUS_ORDER))
    rows = [
        ("cells", f"{len(cells)}: " + ", ".join(f"{counts[s]} {s}" for s in statuses) if len(cells) else "0"),
        ("git commit", _distinct(results["git"])),
        ("device", _distinct(results["device"])),
        ("python", ", ".join(collected.python) or "unknown"),
        ("packages", ", ".join(f"{name} {' / '.join(versions)}" for name, versions in collected.packages.items())
         or "unknown"),
    ]
    table = "\n".join(f"<tr><th>{escape(key)}</th><td>{escape(value)}</td></tr>" for key, value in rows)
    return f'<section id="provenance">\n<h2>Provenance</h2>\n<table class="kv">\n{table}\n</table>\n</section>'


def _distinct(column: pd.Series) -> str:
    return ", ".join(sorted(set(column.dropna()))) or "unknown"


def _finding(finding: Finding) -> str:
    header = "".join(f"<th>{escape(str(c))}</th>" for c in finding.columns)
    body = "\n".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in row) + "</tr>" for row in finding.rows)
    return (f'<h3>{escape(finding.title)}</h3>\n<p class="verdict">{escape(finding.verdict)}</p>\n'
            f'<table class="board baselines"><thead><tr>{header}</tr></thead>\n<tbody>\n{body}\n</tbody></table>')


def _model_section(rows: pd.DataFrame, layout: ModelLayout, plots: dict, models: dict, methods: dict,
                   metric_provenance: dict[tuple[str, str], list[str]], findings: list[Finding]) -> str:
    model = layout.model
    cells = rows.drop_duplicates(["method", "nfe"]).set_index(["method", "nfe"])  # one guidance scale: one cell each
    measured = cells["nfe_measured"]
    audit = cells[measured.notna() & ((measured - cells.index.get_level_values("nfe")).abs() > 1e-9)]
    parts = [f'<section id="{_anchor(layout.name)}">', f"<h2>{escape(layout.name)}</h2>"]
    if models.get(model, {}).get("description"):
        parts.append(f'<p class="description">{escape(models[model]["description"])}</p>')
    if not layout.metrics:
        parts.append("<p>No metrics: no cell of this model has been evaluated.</p>")
    for metric in layout.metrics:
        table = _metric_table(rows[rows["metric"] == metric], cells, audit, layout, metric, methods)
        plot = plots.get((layout.name, metric))
        image = (f'<img src="plots/{escape(plot)}" alt="{escape(f"{layout.name}: {metric} vs NFE")}">' if plot else "")
        parts.append(f'<div class="metric">\n{table}\n{image}\n</div>')
    parts.append(_baseline_section(rows, layout, methods))
    if layout.guidance == 1:  # a model's plots across its guidance scales, once
        images = [name for (plotted, kind), name in sorted(plots.items()) if plotted == model
                  and (kind == "tradeoff" or kind.startswith("guidance:"))]
        if images:
            parts.append("<h3>Across guidance scales</h3>\n<div class=\"metric\">"
                         + "".join(f'<img src="plots/{escape(name)}" alt="{escape(name)}">' for name in images) + "</div>")
    if layout.guidance == 1:  # the findings are about the models without guidance
        parts.extend(_finding(f) for f in findings if f.model == model)
    parts.append(_metric_provenance(model, layout.metrics, metric_provenance))
    parts.append("</section>")
    return "\n".join(part for part in parts if part)


def _baseline_section(rows: pd.DataFrame, layout: ModelLayout, methods: dict) -> str:
    comparisons = compare_to_baselines(rows, layout.metrics, methods)
    if not comparisons:
        return ""
    body = []
    for c in comparisons:
        points = "; ".join(f"NFE {nfe}: {value:.4g} vs {base:.4g}" for nfe, value, base in c.points) or "—"
        css = ' class="best"' if c.wins else ""
        body.append(f"<tr><th class=\"method\">{escape(c.method)}</th><td>{escape(c.baseline)}</td>"
                    f"<td>{escape(points)}</td><td{css}>{escape(c.verdict)}</td></tr>")
    metric = comparisons[0].metric
    return (f'<h3>Versus baselines <span class="direction">{escape(metric)} at NFE '
            f"{FEW_NFE.start}-{FEW_NFE.stop - 1}, {escape(direction_label(metric))}; within "
            f"{MATCH_TOLERANCE:.0%} counts as matching</span></h3>\n"
            '<table class="board baselines"><thead><tr><th>method</th><th>baseline</th><th>method vs baseline</th>'
            "<th>verdict</th></tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table>")


def _metric_table(values: pd.DataFrame, cells: pd.DataFrame, audit: pd.DataFrame, layout: ModelLayout, metric: str,
                  methods: dict) -> str:
    values = values.set_index(["method", "nfe"])
    ranked = values[(values["status"] == "ok") & values["value"].notna()]
    best: set = set()
    direction = ""
    # The direction is only looked up where there is something to rank.
    if not ranked.empty:
        higher = higher_is_better(metric)
        by_nfe = ranked.groupby(level="nfe")["value"]
        target = by_nfe.transform("max" if higher else "min")
        best = set(ranked.index[ranked["value"] == target])
        direction = f' <span class="direction">({escape(direction_label(metric))})</span>'

    table_id = _anchor(f"{layout.name}--{metric}")
    header = "".join(f'<th scope="col">{nfe}</th>' for nfe in layout.nfes)
    lines = [
        f'<div><h3 id="{table_id}">{escape(metric)}{direction}</h3>',
        f'<table class="board" id="table-{table_id}" data-model="{escape(layout.model)}" '
        f'data-metric="{escape(metric)}">',
        f'<thead><tr><th scope="col">method \\ NFE</th>{header}</tr></thead>',
        "<tbody>",
    ]
    for method in layout.methods:
        family = methods.get(method, {}).get("family") or _first(cells, method, "family")
        title = methods.get(method, {}).get("description", "")
        row = [f'<th scope="row" class="method" title="{escape(title)}">{escape(method)}'
               + (f' <span class="family">{escape(family)}</span>' if family else "") + "</th>"]
        for nfe in layout.nfes:
            key = (method, nfe)
            text, classes, tip = _cell_content(key, values, cells)
            if key in best:
                classes.append("best")
            if key in audit.index:
                classes.append("audit-flag")
                text += " &dagger;"
                tip = f"{tip} measured NFE {audit.loc[key, 'nfe_measured']:g} != requested {nfe}".strip()
            row.append(f'<td class="{escape(" ".join(classes))}" data-method="{escape(method)}" data-nfe="{nfe}"'
                       + (f' title="{escape(tip)}"' if tip else "") + f">{text}</td>")
        lines.append("<tr>" + "".join(row) + "</tr>")
    lines.append("</tbody>")
    if not audit.empty:
        flagged = "; ".join(f"{escape(method)} @ NFE {nfe}: measured {row.nfe_measured:g}"
                            for (method, nfe), row in audit.iterrows())
        lines.append(f'<tfoot><tr class="audit"><td colspan="{len(layout.nfes) + 1}">&dagger; NFE audit: '
                     "measured network evaluations per sample differ from the requested NFE &mdash; "
                     f"{flagged}</td></tr></tfoot>")
    lines.append("</table></div>")
    return "\n".join(lines)


def _cell_content(key: tuple[str, int], values: pd.DataFrame, cells: pd.DataFrame) -> tuple[str, list[str], str]:
    """(inner HTML, CSS classes, tooltip) of one table cell."""
    if key not in cells.index:
        return "&mdash;", ["not-run"], "no result for this cell"
    cell = cells.loc[key]
    if cell["status"] == "unsupported":
        return f"n/a ({escape(cell['reason'])})", ["unsupported"], ""
    if key not in values.index:
        if cell["status"] in ("diverged", "damaged", "stale"):  # damaged or stale cells show no numbers
            return escape(cell["status"]), [cell["status"]], cell["reason"]
        return "missing", ["missing"], cell["reason"] or "metric not in metrics.json"
    row = values.loc[key]
    if pd.isna(row["value"]):
        label = "diverged" if row["status"] == "diverged" else "non-finite"
        return label, [label], row["reason"]
    text = _format_value(row["value"], row["ci_low"], row["ci_high"])
    if row["status"] != "ok":  # e.g. the wall time of a diverged cell: shown, never ranked
        return f"{text} ({escape(row['status'])})", [row["status"]], row["reason"]
    return text, ["value"], ""


def _format_value(value: float, ci_low: float, ci_high: float) -> str:
    text = f"{value:.4g}"
    if pd.isna(ci_low) or pd.isna(ci_high):
        return text
    if math.isclose(value - ci_low, ci_high - value, rel_tol=1e-2, abs_tol=1e-12):
        return f'{text} <span class="ci">&plusmn; {(ci_high - ci_low) / 2:.2g}</span>'
    return f'{text} <span class="ci">[{ci_low:.4g}, {ci_high:.4g}]</span>'


def _metric_provenance(model: str, metrics: list[str], metric_provenance: dict[tuple[str, str], list[str]]) -> str:
    entries = [(metric, metric_provenance[(model, metric)])
               for metric in metrics if (model, metric) in metric_provenance]
    if not entries:
        return ""
    items = "\n".join(f"<dt>{escape(metric)}</dt>"
                      + "".join(f"<dd><pre>{escape(record)}</pre></dd>" for record in records)
                      for metric, records in entries)
    return f"<details><summary>Metric provenance ({escape(model)})</summary>\n<dl>\n{items}\n</dl>\n</details>"


def _first(cells: pd.DataFrame, method: str, column: str) -> str | None:
    values = cells[cells.index.get_level_values("method") == method][column].dropna()
    return values.iloc[0] if len(values) else None


def _anchor(text: str) -> str:
    return escape("".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text))
