"""Prepared methods when the model or a candidate run diverges (NaN/Inf).

A diverged calibration sample or candidate must lose or be left out, never win or poison the
prepared artifact; a cell whose own run stays finite must not be reported diverged because of its
side data, and a cell whose run diverged must say so (DESIGN.md, rules of measurement).
The model is exact gmm2d wrapped to return NaN where a test says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness.cells import generate
from harness.config import load_models
from harness.methods import make_sampler
from harness.models import load_denoiser
from harness.models.base import Denoiser
from harness.noise import SampleNoise
from harness.prepared import CALIBRATION_SEED

REPO = Path(__file__).resolve().parents[1]
LOGSNR = {"kind": "logsnr_uniform"}
NFE = 6


class NaNWhere(Denoiser):
    """The wrapped denoiser, with NaN outputs on the rows where bad(x, sigma) holds."""

    def __init__(self, inner: Denoiser, bad):
        self.inner, self.info, self.bad = inner, inner.info, bad

    def denoise(self, x, sigma, cond=None):
        out = self.inner.denoise(x, sigma, cond)
        return torch.where(self.bad(x, sigma).view(-1, *[1] * (x.ndim - 1)), float("nan"), out)


@pytest.fixture(scope="module")
def gmm():
    return load_denoiser(load_models(REPO / "models.yaml")["gmm2d"])


def spec(solver, schedule=None, **params):
    return {"family": "solver", "solver": solver, "schedule": schedule or {"kind": "edm_rho", "rho": 7.0},
            "params": params}


def prepared_sampler(method_spec, denoiser):
    sampler = make_sampler(method_spec)
    sampler.use_prepared(sampler.prepare(denoiser, NFE, CALIBRATION_SEED))
    return sampler


def band_between(sampler, model, k):
    """NaN for sigma~ strictly inside the cell's k-th and (k+1)-th levels (5% inside each): calibration
    runs on finer grids cross it, the cell itself never evaluates there."""
    levels = sampler.sigmas(model.process, NFE)
    lo, hi = levels[k + 1] * 1.05, levels[k] * 0.95
    return NaNWhere(model, lambda x, sigma: (sigma > lo) & (sigma < hi))


def largest_draw_overflows(model, num_calibration):
    """NaN at sigma_max for the calibration draw of largest norm (as a network overflowing on an outlier)."""
    sigma_max = model.process.sigma_max
    draws = SampleNoise(CALIBRATION_SEED, range(num_calibration)).randn(model.info.data_shape, dtype=model.info.dtype)
    limit = 0.999 * float((draws * model.process.prior_std(sigma_max)).flatten(1).norm(dim=1).max())
    return NaNWhere(model, lambda x, sigma: (sigma > 0.99 * sigma_max) & (x.flatten(1).norm(dim=1) > limit))


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


# ---- DC-Solver: ratios fitted against a reference trajectory ----

DC = spec("dc_solver", LOGSNR, reference_substeps=10)


def test_dc_solver_keeps_unit_ratios_where_its_reference_diverged(gmm):
    """The reference's substeps cross a NaN band between the cell's levels 3 and 4: Brent on a NaN
    loss returned NaN ratios, and the cell (which never evaluates in the band) came out diverged."""
    clean = make_sampler(DC).prepare(gmm, NFE, CALIBRATION_SEED)["ratios"]
    model = band_between(make_sampler(DC), gmm, 3)
    sampler = prepared_sampler(DC, model)
    ratios = sampler.prepared["ratios"]
    assert all_finite(ratios), ratios
    assert ratios[:3] == clean[:3]  # fitted before the band as without it
    assert ratios[3:] == [1.0] * (NFE - 3)  # nothing to fit against: plain UniPC steps
    assert generate(model, sampler, NFE, 0, 16, 16).status == "ok"


def test_dc_solver_fits_on_the_calibration_samples_whose_reference_is_finite(gmm):
    model = largest_draw_overflows(gmm, 10)  # calibration_samples defaults to 10
    ratios = make_sampler(DC).prepare(model, NFE, CALIBRATION_SEED)["ratios"]
    assert all_finite(ratios), ratios
    assert all(r != 1.0 for r in ratios[2:]), ratios  # still fitted, not given up


# ---- DPM-Solver-v3: empirical model statistics ----

V3 = spec("dpm_solver_v3", LOGSNR, num_samples=32, grid_points=40)


def statistics_finite(artifact) -> bool:
    return all(bool(torch.isfinite(artifact[k]).all()) for k in ("l", "s", "b"))


def test_dc_solver_fits_on_the_calibration_samples_whose_own_run_is_finite(gmm):
    """One calibration row diverging in the fitted run only (its reference stays finite) must not turn every
    later ratio into the plain step: the fit leaves that row out, and the artifact counts it."""
    sampler = make_sampler(DC)
    clean = sampler.prepare(gmm, NFE, CALIBRATION_SEED)
    levels = sampler.sigmas(gmm.process, NFE)
    reference_calls, calls = (len(levels) - 2) * DC["params"]["reference_substeps"] + 1, [0]

    def bad(x, sigma):  # row 0, below the second level, after the reference run
        calls[0] += 1
        rows = torch.zeros(len(x), dtype=torch.bool)
        rows[0] = calls[0] > reference_calls and bool((torch.as_tensor(sigma) <= levels[2] * 1.0001).all())
        return rows

    fitted = make_sampler(DC).prepare(NaNWhere(gmm, bad), NFE, CALIBRATION_SEED)
    assert clean["ratios"][2:] != [1.0] * (len(levels) - 3)  # the clean fit moves the ratios
    assert all_finite(fitted["ratios"]) and fitted["ratios"][2:] != [1.0] * (len(levels) - 3)
    assert fitted["calibration_samples_diverged"] == 1 and fitted["unfitted_steps"] == []
    assert clean["calibration_samples_diverged"] == 0


def test_dpm_solver_v3_statistics_leave_out_a_diverged_calibration_trajectory(gmm):
    """One calibration draw overflowing made every mean NaN from the first grid point on, and every
    cell sampled with those statistics diverged."""
    artifact = make_sampler(V3).prepare(largest_draw_overflows(gmm, 32), NFE, CALIBRATION_SEED)
    assert statistics_finite(artifact)
    assert artifact["diverged_samples"] == 1 and artifact["fallback_grid_points"] == 0
    clean = make_sampler(V3).prepare(gmm, NFE, CALIBRATION_SEED)
    assert torch.allclose(artifact["l"], clean["l"], atol=0.05)  # 31 of the 32 trajectories: nearly the same
    sampler = make_sampler(V3)
    sampler.use_prepared(artifact)
    assert generate(gmm, sampler, NFE, 0, 16, 16).status == "ok"


def test_dpm_solver_v3_without_finite_trajectories_falls_back_to_dpm_solver_pp(gmm):
    """Every trajectory dies in a NaN band between the cell's levels 2 and 3: below it there are no
    statistics, where DPM-Solver++'s l = 1, s = b = 0 stands in (NaN there poisoned the integrals of
    the whole grid, and the cell, which never evaluates in the band, came out diverged)."""
    model = band_between(make_sampler(V3), gmm, 2)
    sampler = prepared_sampler(V3, model)
    artifact = sampler.prepared
    assert statistics_finite(artifact)
    below = artifact["lambdas"] > -math.log(sampler.sigmas(gmm.process, NFE)[3])
    assert bool((artifact["l"][below] == 1).all() and (artifact["s"][below] == 0).all()
                and (artifact["b"][below] == 0).all())
    assert generate(model, sampler, NFE, 0, 16, 16).status == "ok"


# ---- schedule searches: candidates scored by paired RMS distance to a reference ----

SMALL_SEARCH = {"calibration_samples": 8, "max_evals": 12, "population": 4, "reference_steps": 50}
SEARCHES = {"autodiffusion": spec("autodiffusion", **SMALL_SEARCH), "usf": spec("usf", **SMALL_SEARCH)}


@pytest.mark.parametrize("method_id", list(SEARCHES))
def test_search_diverged_candidates_lose(gmm, method_id):
    """NaN just around the base schedule's third level: every seed diverges, the search must pick a
    finite schedule away from it (a NaN score would win a min() taken from the first seed)."""
    level = make_sampler(SEARCHES[method_id]).sigmas(gmm.process, NFE)[2]
    model = NaNWhere(gmm, lambda x, sigma: (sigma > 0.999 * level) & (sigma < 1.001 * level))
    sampler = prepared_sampler(SEARCHES[method_id], model)
    artifact = sampler.prepared
    assert artifact["objective_initial"] == math.inf and math.isfinite(artifact["objective"])
    assert generate(model, sampler, NFE, 0, 16, 16).status == "ok"


@pytest.mark.parametrize("method_id", list(SEARCHES))
def test_search_keeps_the_base_when_every_candidate_diverges(gmm, method_id):
    base = make_sampler(SEARCHES[method_id]).sigmas(gmm.process, NFE)
    artifact = make_sampler(SEARCHES[method_id]).prepare(NaNWhere(gmm, lambda x, sigma: sigma < 1.0), NFE,
                                                         CALIBRATION_SEED)
    assert artifact["objective"] == artifact["objective_initial"] == math.inf
    assert artifact["sigmas"] == pytest.approx(base, rel=1e-12)
    if method_id == "usf":  # the first seed's decisions, DPM-Solver++(2M)
        assert artifact["orders"] == [2] * NFE and artifact["correctors"] == [0] * NFE


@pytest.mark.parametrize("method_id", list(SEARCHES))
def test_search_scores_on_the_calibration_samples_whose_reference_is_finite(gmm, method_id):
    """One calibration draw overflowing made every candidate's score +inf: the search silently kept
    the base schedule."""
    artifact = make_sampler(SEARCHES[method_id]).prepare(largest_draw_overflows(gmm, 8), NFE, CALIBRATION_SEED)
    assert math.isfinite(artifact["objective_initial"]) and artifact["objective"] <= artifact["objective_initial"]
    assert artifact["search"]["calibration_samples_diverged"] == 1


# ---- DMCMC: the chain hands its least-noise state to a solver ----


def test_dmcmc_chain_that_diverged_is_reported_not_hidden(gmm):
    """NaN around the chain's start level: no level estimate is finite, and the chain handed its
    starting state (at start_sigma) to a solver started at sigma_max, a finite wrong sample in a cell
    reported ok."""
    sampler = make_sampler(spec("dmcmc", start_sigma=2.0))
    model = NaNWhere(gmm, lambda x, sigma: (sigma > 1.5) & (sigma < 2.5))
    assert generate(model, sampler, NFE, 0, 16, 16).status == "diverged"
    assert generate(gmm, sampler, NFE, 0, 16, 16).status == "ok"
