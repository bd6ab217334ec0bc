"""The leaderboard site in a real browser, opened in headless Chromium through the DevTools protocol:
- a small grid (gmm2d + digits-ideal, four methods, three NFEs) sampled and evaluated with the real code, with
  markup in its configs (injection) and exact sorting checks;
- the default grid's own report, rendered afresh from its results (those `snakemake --cores all` left in this
  checkout, else a run in a scratch copy): every page loads clean, every table has a row per method of the grid.

Skips, saying why, where Chromium is absent (.ci/run installs Debian's `chromium`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cdp import Browser, find_chromium
from conftest import REPO
from harness.cells import run_cell
from harness.cli import DEFAULT_CACHE
from harness.config import load_methods, load_models
from harness.evaluate import evaluate_cell
from harness.grid import expand_grid
from harness.report import render_report

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install "
                                                             "chromium; .ci/run does it)")
METHODS = ["euler", "heun", "dpmpp_2m", "dpmpp_2m_hb"]
NFES = [4, 5, 8]
METRICS = {"gmm2d": ["exact_err", "mse_ref", "wall_s_per_sample"],
           "digits-ideal": ["fid", "kid", "mse_ref", "wall_s_per_sample"]}
NUM_SAMPLES = 64


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The small grid's site; gmm2d's description and euler's carry markup that must stay text."""
    root = tmp_path_factory.mktemp("site")
    # markup in the entries the cells are sampled under (a description is part of the config hash)
    for name in ("models.yaml", "methods.yaml"):
        shutil.copy(REPO / name, root / name)
    edited_models = yaml.safe_load((root / "models.yaml").read_text())
    edited_models["gmm2d"]["description"] = "<img src=x onerror=alert(1)>"
    (root / "models.yaml").write_text(yaml.safe_dump(edited_models, sort_keys=False))
    edited_methods = yaml.safe_load((root / "methods.yaml").read_text())
    edited_methods["euler"]["description"] = "<script>alert(1)</script>"
    (root / "methods.yaml").write_text(yaml.safe_dump(edited_methods, sort_keys=False))
    models, methods = load_models(root / "models.yaml"), load_methods(root / "methods.yaml")
    grid = {"models": list(METRICS), "methods": METHODS, "nfe": NFES, "num_samples": NUM_SAMPLES, "seed": 0}
    (root / "grid.yaml").write_text(yaml.safe_dump(grid))
    results = root / "results"
    for cell in expand_grid(grid, models, methods):
        if not cell.supported:
            continue
        out = cell.path(results, 0)
        run_cell(cell.model, models[cell.model], cell.method, methods[cell.method], cell.nfe, out, NUM_SAMPLES,
                 seed=0, device="cpu", cache_dir=DEFAULT_CACHE, models=models)
        evaluate_cell(out, models[cell.model], methods, METRICS[cell.model], DEFAULT_CACHE)
    out = root / "report"
    render_report(results, out, root / "grid.yaml", root / "models.yaml", root / "methods.yaml")
    return out


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium; .ci/run does it)")
    opened = Browser(CHROMIUM)
    yield opened
    opened.close()


def _open(browser: Browser, page) -> None:
    browser.open(page.resolve().as_uri())
    site_root = page.resolve().parents[0 if page.parent.name not in ("models", "cells") else 1].as_uri()
    # data: URLs are inline (the browser's own control icons), not requests to anywhere
    outside = [url for url in browser.requests() if not url.startswith((site_root + "/", "data:"))]
    assert browser.errors() == [], page
    assert outside == [], f"{page}: requests outside the site"
    assert browser.dialogs() == []


def _column(browser: Browser, table: str, column: int) -> list:
    return browser.eval(f"Array.from(document.querySelectorAll('{table} tbody tr'))"
                        f".map(r => r.cells[{column}].getAttribute('data-sort'))")


@needs_chromium
def test_pages_load_sort_filter_and_show_samples(site, browser, tmp_path):
    pages = [site / "index.html", *sorted((site / "models").glob("*.html"))]
    assert [p.name for p in pages] == ["index.html", "digits-ideal.html", "gmm2d.html"]
    for page in pages:
        _open(browser, page)
        browser.screenshot(tmp_path / f"{page.stem}.png")
        assert (tmp_path / f"{page.stem}.png").stat().st_size > 10_000
    _open(browser, next((site / "cells").glob("digits-ideal__euler__nfe8.html")))
    browser.screenshot(tmp_path / "cell.png")

    _open(browser, site / "models" / "digits-ideal.html")
    table = "table[data-metric=fid]"
    assert browser.eval(f"document.querySelectorAll('{table} tbody tr').length") == len(METHODS)
    assert browser.eval(f"Array.from(document.querySelectorAll('{table} thead th')).map(t => t.textContent)") == [
        "method \\ NFE", "4 ↓", "5 ↓", "8 ↓"]
    # clicking the NFE 8 header sorts by it (cells without a value last), again reverses
    browser.click(f"{table} thead th:nth-child(4)")
    once = _column(browser, table, 3)
    numbers = [float(v) for v in once if v]
    assert len(numbers) == len(METHODS) - 1 and numbers == sorted(numbers) and once[-1] == ""  # heun: even NFE
    assert browser.eval(f"document.querySelector('{table} thead th:nth-child(4)').getAttribute('aria-sort')") == "ascending"
    browser.click(f"{table} thead th:nth-child(4)")
    assert _column(browser, table, 3) == [repr(v) for v in sorted(numbers, reverse=True)] + [""]
    browser.screenshot(tmp_path / "sorted.png")
    # the name filter hides rows in every table and strip
    browser.type_into("#filter-name", "dpmpp")
    visible = browser.eval(f"Array.from(document.querySelectorAll('{table} tbody tr')).filter(r => !r.hidden)"
                           ".map(r => r.dataset.method)")
    assert sorted(visible) == ["dpmpp_2m", "dpmpp_2m_hb"]
    assert browser.eval("Array.from(document.querySelectorAll('.strip figure')).filter(f => !f.hidden).length") \
        == 2 * len(NFES)
    browser.screenshot(tmp_path / "filtered.png")
    # thumbnails: a loaded 4x4 grid per cell, and a strip of first samples per NFE
    grids = browser.eval("Array.from(document.querySelectorAll('img.thumb-grid')).map(i => [i.complete, i.naturalWidth])")
    assert len(grids) == (len(METHODS) - 1) * len(NFES) + 1  # heun: odd NFE only
    assert all(complete and width > 100 for complete, width in grids)
    # the family filter comes from the page's data
    assert browser.eval("Array.from(document.querySelectorAll('#filter-family option')).map(o => o.value)") == ["", "solver"]

    _open(browser, site / "models" / "gmm2d.html")
    assert browser.eval("document.querySelectorAll('img.thumb-grid').length") == 0  # 2-D points: no images
    assert browser.eval("document.querySelectorAll('.plots img').length") >= 3
    assert all(browser.eval("Array.from(document.querySelectorAll('.plots img')).map(i => i.naturalWidth > 300)"))


@needs_chromium
def test_markup_from_configs_is_text_in_the_dom(site, browser):
    _open(browser, site / "models" / "gmm2d.html")
    assert browser.eval("document.getElementById('model-description').textContent") == "<img src=x onerror=alert(1)>"
    assert browser.eval("document.querySelectorAll('main img[src=\"x\"]').length") == 0
    assert browser.eval("document.querySelector('th.method[data-method=euler]').title") == "<script>alert(1)</script>"
    assert browser.eval("JSON.parse(document.getElementById('page-data').textContent).descriptions.euler") \
        == "<script>alert(1)</script>"
    assert browser.eval("document.scripts.length") == 2  # the page's data and its own script, nothing injected
    assert browser.dialogs() == []


def test_site_files_and_script_data_escaped(site):
    """Without a browser: every model has its plots with Pareto fronts and thumbnails where images; the JSON in
    <script> escapes `</`."""
    page = (site / "models" / "gmm2d.html").read_text()
    assert "<script>alert(1)</script>" not in page and "<img src=x" not in page
    data = page.split('<script type="application/json" id="page-data">')[1].split("</script>")[0]
    assert "\\u003c/script\\u003e" in data and json.loads(data)["descriptions"]["euler"] == "<script>alert(1)</script>"
    plots = {p.name for p in (site / "plots").iterdir()}
    for model, metric in (("gmm2d", "exact_err"), ("digits-ideal", "fid")):
        assert {f"{model}__{metric}__{axis}.svg" for axis in ("nfe", "wall", "gflops")} <= plots | {
            f"gmm2d__exact_err__gflops.svg"}
        assert "Pareto front" in (site / "plots" / f"{model}__{metric}__nfe.svg").read_text()
    assert len(list((site / "thumbs").glob("*digits-ideal*__grid.png"))) == (len(METHODS) - 1) * len(NFES) + 1
    rows = json.loads((site / "results.json").read_text())
    assert len(rows) == len((site / "results.csv").read_text().strip().splitlines()) - 1


# ---- the default grid's own report ----

DEFAULT_GRID = REPO / "profiles" / "default" / "grid.yaml"


def _default_grid_results(tmp_path_factory) -> Path:
    """The default grid's results/: this checkout's, where `snakemake --cores all` (the README's first command,
    which .ci/run runs before pytest) has left nothing to do; else the grid runs in a scratch copy (about 11
    minutes on 2 cores), so the test never reads a partial or stale grid."""
    import subprocess
    import sys

    snakemake = str(Path(sys.executable).parent / "snakemake")
    dry = subprocess.run([snakemake, "--cores", "1", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    if dry.returncode == 0 and _rules_to_run(dry.stdout) <= {"report", "all"}:  # every cell done; we render
        return REPO / "results"
    scratch = tmp_path_factory.mktemp("default-grid")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, scratch / name)
    print(f"the default grid is not complete in {REPO}: running it in {scratch}", flush=True)
    subprocess.run([snakemake, "--cores", "all"], cwd=scratch, check=True)
    return scratch / "results"


def _rules_to_run(dry_run: str) -> set[str]:
    """The rules in a Snakemake dry run's job stats (none when it says there is nothing to be done)."""
    if "Nothing to be done" in dry_run:
        return set()
    if "Job stats:" not in dry_run:
        return {"unknown"}
    rules = set()
    for line in dry_run.rsplit("Job stats:", 1)[1].splitlines()[3:]:  # after the header and its rule
        if not line.strip() or line.startswith("total"):
            break
        rules.add(line.split()[0])
    return rules


@pytest.fixture(scope="module")
def default_site(tmp_path_factory):
    """(site folder, the default grid's cells): its report rendered afresh from its results."""
    results = _default_grid_results(tmp_path_factory)
    out = tmp_path_factory.mktemp("default-site")
    render_report(results, out, DEFAULT_GRID, REPO / "models.yaml", REPO / "methods.yaml")
    grid = yaml.safe_load(DEFAULT_GRID.read_text())
    return out, expand_grid(grid, load_models(REPO / "models.yaml"), load_methods(REPO / "methods.yaml"))


def test_default_grid_has_an_overview_plots_with_pareto_fronts_and_thumbnails_for_every_model(default_site):
    site, cells = default_site
    models = yaml.safe_load((REPO / "models.yaml").read_text())
    assert (site / "index.html").stat().st_size > 10_000
    for model in dict.fromkeys(c.model for c in cells):
        assert (site / "models" / f"{model}.html").exists(), model
        plots = list((site / "plots").glob(f"{model}__*__nfe.svg"))
        assert plots and all("Pareto front" in p.read_text() for p in plots), model
        if models[model].get("dataset") or models[model].get("train"):  # image models: a grid per cell
            thumbs = list((site / "thumbs").glob(f"cells_{model}_*__grid.png"))
            ok_cells = [c for c in cells if c.model == model and c.supported]
            assert len(thumbs) >= len(ok_cells) > 0, model


@needs_chromium
def test_default_grid_report_in_the_browser(default_site, browser, tmp_path):
    from harness.report.site import slug

    site, cells = default_site
    models = list(dict.fromkeys(c.model for c in cells))
    pages = [site / "index.html", *(site / "models" / f"{m}.html" for m in models)]
    for page in pages:
        _open(browser, page)
        browser.screenshot(tmp_path / f"default-{page.stem}.png")
        assert (tmp_path / f"default-{page.stem}.png").stat().st_size > 10_000

    for model in models:
        # one table per metric and guidance scale, with a row per method the grid gives that scale
        expected = {}
        for c in cells:
            if c.model == model:
                name = model if c.guidance == 1 else f"{model} (guidance {c.guidance:g})"
                expected.setdefault(name, set()).add(c.method)
        _open(browser, site / "models" / f"{model}.html")
        tables = browser.eval("Array.from(document.querySelectorAll('table[data-metric]')).map("
                              "t => [t.id, t.querySelectorAll('tbody tr').length])")
        assert tables, model
        for name, methods in expected.items():
            prefix = f"table-{slug(name + '--')}"
            ours = [(table_id, rows) for table_id, rows in tables if table_id.startswith(prefix)]
            assert ours, (model, name)
            assert {rows for _, rows in ours} == {len(methods)}, (model, name, ours)

    _open(browser, site / "models" / "digits-unet.html")
    table = f"#table-{slug('digits-unet--fid')}"
    headers = browser.eval(f"Array.from(document.querySelectorAll('{table} thead th')).map(t => t.textContent)")
    column = headers.index("8 ↓") + 1
    browser.click(f"{table} thead th:nth-child({column})")
    values = [v for v in _column(browser, table, column - 1)]
    numbers = [float(v) for v in values if v]
    assert len(numbers) > 5 and numbers == sorted(numbers) and all(v for v in values[:len(numbers)])
    browser.screenshot(tmp_path / "default-sorted.png")
    total = browser.eval(f"document.querySelectorAll('{table} tbody tr').length")
    browser.type_into("#filter-name", "dpmpp")
    visible = browser.eval(f"Array.from(document.querySelectorAll('{table} tbody tr')).filter(r => !r.hidden)"
                           ".map(r => r.dataset.method)")
    assert visible and len(visible) < total and all("dpmpp" in m for m in visible)
    browser.screenshot(tmp_path / "default-filtered.png")

    _open(browser, site / "models" / "digits-ideal.html")
    grids = browser.eval("Array.from(document.querySelectorAll('img.thumb-grid')).map(i => [i.complete, i.naturalWidth])")
    ideal_cells = [c for c in cells if c.model == "digits-ideal" and c.supported]
    assert len(grids) == len(ideal_cells) and all(complete and width > 100 for complete, width in grids)
    browser.screenshot(tmp_path / "default-digits-ideal.png")
