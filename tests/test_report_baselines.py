"""The leaderboard says plainly whether a method beats the baseline it builds on at few NFE."""

import pandas as pd

from harness.report.baselines import compare_to_baselines
from harness.report.collect import Collected, _as_table
from harness.report.layout import ModelLayout
from harness.report.significance import Significance
from harness.report.site import baseline_rows, environment

METHODS = {
    "base": {"family": "solver", "solver": "euler"},
    "good": {"family": "solver", "solver": "euler", "baseline": "base"},
    "bad": {"family": "solver", "solver": "euler", "baseline": "base"},
    "alone": {"family": "solver", "solver": "euler", "baseline": "base"},
}


def _rows(points):
    return pd.DataFrame([{"method": m, "nfe": n, "metric": metric, "value": v, "status": status}
                         for m, n, metric, v, status in points])


def test_verdicts_follow_the_error_metric_at_few_nfe():
    rows = _rows([
        ("base", 5, "exact_err", 1.0, "ok"), ("base", 8, "exact_err", 0.5, "ok"), ("base", 20, "exact_err", 0.1, "ok"),
        ("good", 5, "exact_err", 1.2, "ok"), ("good", 8, "exact_err", 0.4, "ok"),
        ("bad", 5, "exact_err", 1.5, "ok"), ("bad", 8, "exact_err", 0.6, "ok"),
        ("bad", 20, "exact_err", 0.01, "ok"),  # outside 5-10: does not count
        ("good", 8, "wall_s_per_sample", 9.0, "ok"),
    ])
    by_method = {c.method: c for c in compare_to_baselines(rows, ["exact_err", "wall_s_per_sample"], METHODS)}
    assert set(by_method) == {"good", "bad"}  # "alone" has no results, so no comparison
    assert by_method["good"].wins == [8]
    assert by_method["good"].verdict == "beats or matches base at NFE 8"
    assert by_method["bad"].wins == [] and by_method["bad"].verdict == "does not beat base here (NFE 5, 8)"


def test_within_one_percent_counts_as_matching_and_diverged_cells_do_not_count():
    rows = _rows([("base", 6, "mse_ref", 1.0, "ok"), ("good", 6, "mse_ref", 1.009, "ok"),
                  ("base", 7, "mse_ref", 1.0, "ok"), ("bad", 7, "mse_ref", None, "diverged")])
    by_method = {c.method: c for c in compare_to_baselines(rows, ["mse_ref"], METHODS)}
    assert by_method["good"].wins == [6]
    assert by_method["bad"].points == [] and by_method["bad"].verdict.startswith("no NFE in 5-10")


def test_section_renders_the_plain_verdict():
    rows = _rows([("base", 5, "exact_err", 1.0, "ok"), ("bad", 5, "exact_err", 2.0, "ok")])
    empty = _as_table([])
    section = baseline_rows(rows, ModelLayout("m", ["base", "bad"], [5], ["exact_err"]), METHODS,
                            Significance(Collected(empty, empty), METHODS))
    html = str(environment().get_template("macros.html").module.baselines(section))
    assert "does not beat base here (NFE 5)" in html
    assert "NFE 5: 2 vs 1 — not paired (no replicates)" in html
