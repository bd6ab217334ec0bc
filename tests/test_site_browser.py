"""The leaderboard site in a real browser: a small grid (gmm2d + digits-ideal, four methods, three NFEs) sampled
and evaluated with the real code, rendered, and opened in headless Chromium through the DevTools protocol.

Skips, saying why, where Chromium is absent (.ci/run installs Debian's `chromium`).
"""

from __future__ import annotations

import json
import shutil

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
