"""The leaderboard report: results.csv, index.html and plots from a small fake results directory."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from harness.cells import cell_config_hash
from harness.cli import cli
from harness.config import load_methods, load_models
from harness.errors import StepbenchError
from harness.metrics import METRICS
from harness.metrics.base import Metric
from harness.files import sha256_file
from harness.report import render_report

REPO = Path(__file__).resolve().parents[1]
MODELS, METHODS = load_models(REPO / "models.yaml"), load_methods(REPO / "methods.yaml")
REQUIRED_COLUMNS = ["model", "method", "family", "nfe", "nfe_measured", "network_evals", "metric", "value", "ci_low",
                    "ci_high", "status", "reason", "num_samples", "seed", "wall_s", "config_hash", "device"]


def write_cell(results: Path, model: str, method: str, nfe: int, metrics: dict | None, *, status: str = "ok",
               nfe_measured: float | None = None, ci: dict | None = None, where: str | None = None,
               seed: int = 0, replicates: dict | None = None) -> Path:
    """A cell as `stepbench sample` + `evaluate` write it (samples hashed, metrics naming the cell, the config hash
    of today's entries where the method exists, for 100 samples as the fixture's grid asks); metrics=None leaves it
    unevaluated."""
    cell_dir = results / (where or f"cells/{model}/{method}/nfe{nfe}")
    cell_dir.mkdir(parents=True)
    np.savez(cell_dir / "samples.npz", samples=np.zeros((100, 2), dtype=np.float32))
    measured = float(nfe if nfe_measured is None else nfe_measured)
    config = (cell_config_hash(MODELS[model], METHODS[method], nfe, seed, 100) if method in METHODS
              else f"hash-{method}-{nfe}")
    cell = {"model": model, "method": method, "family": "solver", "nfe": nfe, "nfe_measured": measured,
            "network_evals": measured, "num_samples": 100, "seed": seed, "batch_size": 100, "wall_s": 0.5,
            "peak_mem_mb": 300.0, "status": status, "samples_sha256": sha256_file(cell_dir / "samples.npz"),
            "provenance": {"config_hash": config, "device": "cpu (test)", "git": "abc123",
                           "python": "3.11.7", "packages": {"torch": "2.0.0", "numpy": "1.26.0"}}}
    (cell_dir / "cell.json").write_text(json.dumps(cell))
    if metrics is not None:
        record = {"status": status, "ci": ci or {}, "provenance": {name: {"test": name} for name in metrics},
                  "cell": {"config_hash": config, "samples_sha256": cell["samples_sha256"]},
                  "replicates": {name: {"seed": 1, "num_samples": 100, "values": list(map(float, values))}
                                 for name, values in (replicates or {}).items()}, **metrics}
        (cell_dir / "metrics.json").write_text(json.dumps(record))
    return cell_dir


@pytest.fixture
def workspace(tmp_path):
    """gmm2d x {euler, heun, dpmpp_2m} x NFE {4, 5}: ok, unsupported (heun@4), missing (dpmpp_2m@4),
    diverged (dpmpp_2m@5, stored at a path that does not name it) and an NFE audit mismatch (heun@5)."""
    models_file, methods_file = tmp_path / "models.yaml", tmp_path / "methods.yaml"
    shutil.copy(REPO / "models.yaml", models_file)
    shutil.copy(REPO / "methods.yaml", methods_file)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"models": ["gmm2d"], "methods": ["euler", "heun", "dpmpp_2m"], "nfe": [4, 5],
                                         "num_samples": 100, "models_file": str(models_file),
                                         "methods_file": str(methods_file)}))
    results = tmp_path / "results"
    write_cell(results, "gmm2d", "euler", 4, {"exact_err": 0.5, "wall_s_per_sample": 2e-4})
    write_cell(results, "gmm2d", "euler", 5, {"exact_err": 0.3, "wall_s_per_sample": 3e-4, "score": 0.9},
               ci={"exact_err": [0.28, 0.32], "score": [0.85, 0.95]})
    write_cell(results, "gmm2d", "heun", 5, {"exact_err": 0.1, "wall_s_per_sample": 4e-4, "score": 0.5},
               nfe_measured=6, ci={"exact_err": [0.08, 0.12], "score": [0.45, 0.55]})
    # Diverged cells keep their cost: the fastest wall time here must not win.
    write_cell(results, "gmm2d", "dpmpp_2m", 5, {"exact_err": None, "wall_s_per_sample": 1e-6}, status="diverged",
               where="cells/misfiled/somewhere")
    return {"results": results, "out": tmp_path / "report", "grid": grid_file, "models": models_file,
            "methods": methods_file}


def render(ws: dict, *, grid: bool = True, out: Path | None = None) -> Path:
    out = out or ws["out"]
    render_report(ws["results"], out, ws["grid"] if grid else None, ws["models"], ws["methods"])
    return out


class BoardParser(HTMLParser):
    """Leaderboard tables: (model, metric) -> {(method, nfe): (css classes, text)}, plus footer notes."""

    def __init__(self):
        super().__init__()
        self.tables: dict[tuple[str, str], dict] = {}
        self.footers: dict[tuple[str, str], str] = {}
        self.images: list[str] = []
        self._table = self._cell = None
        self._in_tfoot = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "data-metric" in attrs:
            self._table = (attrs["data-model"], attrs["data-metric"])
            self.tables[self._table] = {}
            self.footers[self._table] = ""
        elif tag == "tfoot":
            self._in_tfoot = True
        elif tag == "td" and self._table and "data-method" in attrs:
            self._cell = (attrs["data-method"], int(attrs["data-nfe"]))
            self.tables[self._table][self._cell] = (set(attrs["class"].split()), "")
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tfoot":
            self._in_tfoot = False
        elif tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell:
            classes, text = self.tables[self._table][self._cell]
            self.tables[self._table][self._cell] = (classes, text + data)
        elif self._in_tfoot:
            self.footers[self._table] += data


def parse_page(out: Path, model: str = "gmm2d") -> BoardParser:
    """The model's page, where its tables and plots are."""
    parser = BoardParser()
    parser.feed((out / "models" / f"{model}.html").read_text())
    return parser


def best_cells(table: dict) -> set:
    return {key for key, (classes, _) in table.items() if "best" in classes}


def test_results_csv_has_one_row_per_cell_and_metric(workspace):
    results = pd.read_csv(render(workspace) / "results.csv", keep_default_na=False, na_values=[""])
    assert set(REQUIRED_COLUMNS) <= set(results.columns)
    assert results.equals(results.sort_values(["model", "method", "nfe", "metric"], na_position="first")
                          .reset_index(drop=True))
    rows = {(r.method, r.nfe, r.metric if isinstance(r.metric, str) else None): r for r in results.itertuples()}
    assert set(rows) == {
        ("dpmpp_2m", 4, None), ("dpmpp_2m", 5, "exact_err"), ("dpmpp_2m", 5, "wall_s_per_sample"),
        ("euler", 4, "exact_err"), ("euler", 4, "wall_s_per_sample"),
        ("euler", 5, "exact_err"), ("euler", 5, "score"), ("euler", 5, "wall_s_per_sample"),
        ("heun", 4, None), ("heun", 5, "exact_err"), ("heun", 5, "score"), ("heun", 5, "wall_s_per_sample"),
    }
    euler5 = rows["euler", 5, "exact_err"]
    assert (euler5.value, euler5.ci_low, euler5.ci_high, euler5.status) == (0.3, 0.28, 0.32, "ok")
    assert (euler5.family, euler5.seed, euler5.num_samples, euler5.device) == ("solver", 0, 100, "cpu (test)")
    assert euler5.config_hash == cell_config_hash(MODELS["gmm2d"], METHODS["euler"], 5, 0, 100) and euler5.cell_dir == "cells/gmm2d/euler/nfe5"
    assert rows["heun", 5, "exact_err"].nfe_measured == 6.0
    unsupported = rows["heun", 4, None]
    assert unsupported.status == "unsupported" and unsupported.reason == "NFE = 2*steps-1; nearest 3, 5"
    assert rows["dpmpp_2m", 4, None].status == "missing"
    diverged = rows["dpmpp_2m", 5, "exact_err"]
    assert diverged.status == "diverged" and pd.isna(diverged.value)
    assert diverged.cell_dir == "cells/misfiled/somewhere"
    assert rows["dpmpp_2m", 5, "wall_s_per_sample"].value == 1e-6


def test_page_tables_show_status_and_highlight_best(workspace):
    page = parse_page(render(workspace))
    # models.yaml lists mse_ref and peak_mem_mb for gmm2d: no cell has them, so they show as missing.
    assert set(page.tables) == {("gmm2d", m) for m in
                                ("exact_err", "mse_ref", "wall_s_per_sample", "peak_mem_mb", "score")}
    exact = page.tables["gmm2d", "exact_err"]
    assert exact["heun", 4][1].startswith("n/a (") and exact["heun", 4][1] == "n/a (NFE = 2*steps-1; nearest 3, 5)"
    assert exact["dpmpp_2m", 4] == ({"missing"}, "missing")
    assert exact["dpmpp_2m", 5] == ({"diverged"}, "diverged")
    assert exact["euler", 5][1] == "0.3[0.28, 0.32]"  # every interval as [lo, hi] (under the value)
    # bold only where the intervals support it: heun@5's does not overlap euler@5's; NFE 4 has one value only
    assert best_cells(exact) == {("heun", 5)}
    # no intervals, nothing the data support: wall times are not highlighted
    assert best_cells(page.tables["gmm2d", "wall_s_per_sample"]) == set()
    assert page.tables["gmm2d", "wall_s_per_sample"]["dpmpp_2m", 5][1] == "1e-06 (diverged)"
    mse_ref = {key: text for key, (_, text) in page.tables["gmm2d", "mse_ref"].items()}
    assert mse_ref.pop(("heun", 4)).startswith("n/a (") and mse_ref.pop(("dpmpp_2m", 5)) == "diverged"
    assert {text.removesuffix(" †") for text in mse_ref.values()} == {"missing"}  # † marks heun@5's audit flag
    # NFE audit: heun@5 measured 6 evaluations per sample.
    assert "audit-flag" in exact["heun", 5][0]
    assert "heun @ NFE 5: measured 6" in page.footers["gmm2d", "exact_err"]


def test_best_respects_the_metric_direction(workspace, monkeypatch):
    page = parse_page(render(workspace, out=workspace["out"] / "unregistered"))
    assert best_cells(page.tables["gmm2d", "score"]) == {("heun", 5)}  # unknown metric: lower is better
    assert "assumed" in (workspace["out"] / "unregistered" / "models" / "gmm2d.html").read_text()

    class Score(Metric):
        name = "score"
        higher_is_better = True

        def compute(self, ctx):
            raise NotImplementedError

    monkeypatch.setitem(METRICS._entries, "score", Score)
    page = parse_page(render(workspace, out=workspace["out"] / "registered"))
    assert best_cells(page.tables["gmm2d", "score"]) == {("euler", 5)}


def test_plots_are_svgs_with_their_data_linked_from_the_page(workspace):
    import xml.etree.ElementTree as ET

    out = render(workspace)
    page = parse_page(out)
    plots = sorted(p.name for p in (out / "plots").iterdir())
    # mse_ref and peak_mem_mb have no value to plot; exact_err is a quality metric: also against wall time (no
    # cell measured GFLOPs here); score and wall time against NFE only
    assert plots == ["gmm2d__exact_err__nfe.svg", "gmm2d__exact_err__wall.svg", "gmm2d__score__nfe.svg",
                     "gmm2d__wall_s_per_sample__nfe.svg"]
    assert sorted(page.images) == [f"../plots/{name}" for name in plots]
    for name in plots:
        root = ET.parse(out / "plots" / name).getroot()
        assert root.tag.endswith("svg") and float(root.get("width").removesuffix("pt")) > 300
        data = pd.read_csv(out / "data" / name.replace(".svg", ".csv"))
        assert {"method", "family", "nfe", "on_front"} <= set(data.columns)
    front = pd.read_csv(out / "data" / "gmm2d__exact_err__nfe.csv")
    # euler@4 (0.5) is the cheapest point, heun@5 (0.1) the best: both on the front, euler@5 (0.3) behind heun@5
    assert set(front[front["on_front"]].apply(lambda r: (r["method"], r["nfe"]), axis=1)) == {("euler", 4), ("heun", 5)}


def test_output_is_deterministic_apart_from_the_timestamp(workspace, tmp_path):
    first, second = render(workspace, out=tmp_path / "a"), render(workspace, out=tmp_path / "b")
    for name in ["results.csv", "results.json", *(f"plots/{p.name}" for p in (first / "plots").iterdir()),
                 *(f"data/{p.name}" for p in (first / "data").iterdir())]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    def without_time(out: Path, page: str) -> str:
        text = (out / page).read_text()
        assert len(re.findall(r"<time [^>]*>.*?</time>", text)) == 1
        return re.sub(r"<time [^>]*>.*?</time>", "", text)

    pages = ["index.html", *(f"models/{p.name}" for p in (first / "models").iterdir()),
             *(f"cells/{p.name}" for p in (first / "cells").iterdir())]
    assert "models/gmm2d.html" in pages and len(pages) > 3
    for page in pages:
        assert without_time(first, page) == without_time(second, page), page


def test_cli_report_without_grid_lists_only_found_cells(workspace):
    out = workspace["out"]
    result = CliRunner().invoke(cli, ["report", str(workspace["results"]), "--out", str(out),
                                      "--models-file", str(workspace["models"]),
                                      "--methods-file", str(workspace["methods"])])
    assert result.exit_code == 0, result.output
    assert str(out / "index.html") in result.output
    results = pd.read_csv(out / "results.csv")
    assert set(results["status"]) == {"ok", "diverged"}
    exact = parse_page(out).tables["gmm2d", "exact_err"]
    assert exact["heun", 4] == ({"not-run"}, "—")


def test_unevaluated_cell_and_html_escaping(workspace):
    write_cell(workspace["results"], "gmm2d", "<b>odd</b>", 5, {"exact_err": 0.2})
    write_cell(workspace["results"], "gmm2d", "euler", 9, None)
    out = render(workspace, grid=False)
    html = (out / "models" / "gmm2d.html").read_text()
    assert "<b>odd</b>" not in html and "&lt;b&gt;odd&lt;/b&gt;" in html
    assert "<b>odd</b>" not in (out / "index.html").read_text()
    results = pd.read_csv(out / "results.csv")
    unevaluated = results[(results["method"] == "euler") & (results["nfe"] == 9)]
    assert list(unevaluated["status"]) == ["missing"] and unevaluated["metric"].isna().all()
    assert parse_page(out).tables["gmm2d", "exact_err"]["euler", 9] == ({"missing"}, "missing")


def test_bad_cells_fail_with_the_file_named(workspace):
    """An unreadable metrics.json shows its cell as damaged, naming the file, with no values."""
    broken = workspace["results"] / "cells" / "gmm2d" / "euler" / "nfe4" / "metrics.json"
    broken.write_text("{")
    render(workspace)
    rows = pd.read_csv(workspace["out"] / "results.csv", keep_default_na=False)
    euler4 = rows[(rows["method"] == "euler") & (rows["nfe"] == 4)]
    assert list(euler4["status"]) == ["damaged"] and list(euler4["value"]) == [""]
    assert euler4["reason"].iloc[0].startswith("metrics.json: malformed JSON")
    broken.unlink()
    write_cell(workspace["results"], "gmm2d", "euler", 5, {"exact_err": 0.3}, where="copy/of/euler5")
    with pytest.raises(StepbenchError, match="gmm2d / euler / NFE 5 / guidance 1 / seed 0 also at"):
        render(workspace)


def test_seeds_of_a_cell_become_mean_and_t_interval(workspace):
    results = workspace["results"]
    values = {1: 0.2, 2: 0.4}
    for seed, value in values.items():
        write_cell(results, "gmm2d", "euler", 9, {"exact_err": value}, where=f"cells/gmm2d/euler/nfe9/seed{seed}",
                   seed=seed)
    render(workspace, grid=False)  # NFE 9 and seeds 1, 2 are not the workspace grid's
    rows = pd.read_csv(workspace["out"] / "results.csv")
    row = rows[(rows["method"] == "euler") & (rows["nfe"] == 9) & (rows["metric"] == "exact_err")].iloc[0]
    # mean 0.3, sd 0.1414, t(0.975, 1) = 12.706: half-width 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert row["value"] == pytest.approx(0.3) and row["n_seeds"] == 2 and pd.isna(row["seed"])
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(0.3 - 1.2706, abs=1e-3), pytest.approx(0.3 + 1.2706, abs=1e-3))
    per_seed = pd.read_csv(workspace["out"] / "results_per_seed.csv")
    assert sorted(per_seed[(per_seed["nfe"] == 9) & (per_seed["metric"] == "exact_err")]["value"]) == [0.2, 0.4]


def test_report_with_a_grid_leaves_out_cells_of_other_grids(workspace):
    """A results directory keeps the cells of earlier grids (another NFE, another seed): a report for a grid
    shows its own cells and seeds only."""
    write_cell(workspace["results"], "gmm2d", "euler", 9, {"exact_err": 0.05}, where="cells/gmm2d/euler/nfe9/seed0")
    other_seed = write_cell(workspace["results"], "gmm2d", "euler", 4, {"exact_err": 9.0},
                            where="cells/gmm2d/euler/nfe4/seed7")
    cell = json.loads((other_seed / "cell.json").read_text())
    (other_seed / "cell.json").write_text(json.dumps({**cell, "seed": 7}))
    render(workspace)
    rows = pd.read_csv(workspace["out"] / "results.csv")
    assert 9 not in set(rows["nfe"])
    euler4 = rows[(rows["method"] == "euler") & (rows["nfe"] == 4) & (rows["metric"] == "exact_err")]
    assert list(euler4["value"]) == [0.5] and list(euler4["n_seeds"]) == [1]
    assert 9 in set(pd.read_csv(render(workspace, grid=False) / "results.csv")["nfe"])  # without a grid: all


def test_paired_significance_marks_a_method_against_its_baseline(workspace):
    """ts_ddim's baseline is euler: replicates over the same resamples, ts_ddim lower by 0.1 in each, mark it
    better at NFE 5 though the two intervals overlap; the mark's tooltip gives the paired interval."""
    spread = np.linspace(-0.2, 0.2, 50)
    shutil.rmtree(workspace["results"] / "cells" / "gmm2d" / "euler" / "nfe5")
    write_cell(workspace["results"], "gmm2d", "euler", 5, {"exact_err": 0.3}, ci={"exact_err": [0.1, 0.5]},
               replicates={"exact_err": 0.3 + spread})
    write_cell(workspace["results"], "gmm2d", "ts_ddim", 5, {"exact_err": 0.2}, ci={"exact_err": [0.0, 0.4]},
               replicates={"exact_err": 0.2 + spread + np.linspace(-0.01, 0.01, 50)})
    out = render(workspace, grid=False)
    exact = parse_page(out).tables["gmm2d", "exact_err"]
    classes, text = exact["ts_ddim", 5]
    assert "sig-better" in classes and "▲" in text
    assert "sig-better" not in exact["euler", 5][0] and "▲" not in exact["euler", 5][1]
    page = (out / "models" / "gmm2d.html").read_text()
    assert "better than its baseline euler (paired bootstrap over samples: difference -0.1 [" in page
    assert "NFE 5: 0.2 vs 0.3 — better (difference -0.1 [" in (out / "index.html").read_text()
