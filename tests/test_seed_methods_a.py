"""Seed-paper accelerators: DPM-Solver-v3, DC-Solver, heavy-ball / GHVB momentum, Time-Shift Sampler.

Each runs on gmm2d and digits-ideal through harness.cells.generate with an audited NFE, is
batch-independent, converges to the exact PF-ODE solution as NFE grows (the time shift excepted: by
design it leaves the ODE, so it is checked with the shift off), and beats its base solver at NFE 5-10
where its paper says it should and this zoo confirms it. Time-Shift does not beat its base here (the
exact denoisers have no exposure bias), so no such claim is tested for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness import prepared
from harness.cells import generate
from harness.config import load_models
from harness.methods import make_sampler
from harness.methods.dc_solver import dc_solver
from harness.methods.dpm_solver_v3 import _Tables, dpm_solver_v3, empirical_model_statistics
from harness.methods.momentum import dpmpp_2m_hb, plms_ghvb, plms_hb
from harness.methods.solvers import dpmpp_2m, euler
from harness.methods.time_shift import ts_dpm
from harness.methods.unipc import unipc
from harness.metrics.reference import rms_distance
from harness.models import load_denoiser
from harness.references import exact_solution

REPO = Path(__file__).resolve().parents[1]
MODELS = load_models(REPO / "models.yaml")
RHO7 = {"kind": "edm_rho", "rho": 7.0}


def spec(solver, schedule=RHO7, **params):
    return {"family": "solver", "solver": solver, "schedule": schedule, "params": params}


METHODS = {
    # small calibration keeps the preparation fast in tests
    "dpm_solver_v3": spec("dpm_solver_v3", {"kind": "logsnr_uniform"}, num_samples=32, grid_points=40),
    "dc_solver": spec("dc_solver", {"kind": "logsnr_uniform"}, reference_substeps=10),
    "plms_hb": spec("plms_hb", beta=0.8),
    "plms_ghvb": spec("plms_ghvb", beta=0.8),
    "dpmpp_2m_hb": spec("dpmpp_2m_hb", beta=0.8),
    "ts_dpm": spec("ts_dpm"),
    "ts_ddim": spec("ts_dpm", order=1),
}


@pytest.fixture(scope="module")
def denoisers():
    return {model_id: load_denoiser(MODELS[model_id]) for model_id in ("gmm2d", "digits-ideal")}


@pytest.fixture(scope="module")
def exact(denoisers):
    return {"gmm2d": exact_solution(denoisers["gmm2d"], 0, 200),
            "digits-ideal": exact_solution(denoisers["digits-ideal"], 0, 32)}


def run(denoisers, model_id, method_spec, nfe, num_samples, cache_dir, batch_size=None):
    """Samples through harness.cells.generate, preparing the artifact in its own step first."""
    sampler = make_sampler(method_spec)
    if sampler.prepare_scope is not None:
        prepared.prepare(sampler, cache_dir, model_id, MODELS[model_id], "method", method_spec, nfe)
        prepared.load(sampler, cache_dir, model_id, MODELS[model_id], "method", method_spec, nfe)
    return generate(denoisers[model_id], sampler, nfe, 0, num_samples, batch_size or num_samples)


@pytest.mark.parametrize("model_id", ["gmm2d", "digits-ideal"])
@pytest.mark.parametrize("method_id", list(METHODS))
def test_nfe_audited_and_batch_independent(denoisers, tmp_path, model_id, method_id):
    whole = run(denoisers, model_id, METHODS[method_id], 6, 10, tmp_path)
    split = run(denoisers, model_id, METHODS[method_id], 6, 10, tmp_path, batch_size=4)
    assert whole.nfe_measured == 6 and split.nfe_measured == 6
    assert whole.status == "ok"
    assert np.array_equal(whole.samples, split.samples)


@pytest.mark.parametrize("method_id", ["dpm_solver_v3", "dc_solver", "plms_hb", "plms_ghvb", "dpmpp_2m_hb"])
def test_converges_to_exact_solution(denoisers, exact, tmp_path, method_id):
    method_spec = METHODS[method_id]
    if method_id == "dpm_solver_v3":
        method_spec = spec("dpm_solver_v3", {"kind": "logsnr_uniform"})  # default calibration
    errors = [rms_distance(run(denoisers, "gmm2d", method_spec, nfe, 200, tmp_path).samples, exact["gmm2d"])
              for nfe in (10, 40)]
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.05, errors


def test_time_shift_off_is_ddim_and_dpm_solver_2_converges(denoisers, exact, tmp_path):
    """With the cutoff above every time step nothing is shifted: TS-DDIM is DDIM (= euler) and TS-DPM
    is multistep DPM-Solver-2, which converges; with the shift on, the samples differ."""
    model = denoisers["digits-ideal"]
    sigmas = [float(s) for s in np.exp(np.linspace(np.log(157.0), np.log(0.01), 8))] + [0.0]
    x = torch.randn(5, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 157.0
    never = 10**9
    assert torch.allclose(ts_dpm(model, x, sigmas, process=model.process, order=1, cutoff=never),
                          euler(model, x, sigmas), rtol=1e-10, atol=1e-10)
    gmm, gmm_sigmas = denoisers["gmm2d"], [80.0, 20.0, 5.0, 1.0, 0.2, 0.002, 0.0]
    x_gmm = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80.0
    shifted = ts_dpm(gmm, x_gmm, gmm_sigmas, process=gmm.process, order=1, cutoff=0)
    assert not torch.allclose(shifted, euler(gmm, x_gmm, gmm_sigmas))
    errors = [rms_distance(run(denoisers, "gmm2d", spec("ts_dpm", cutoff=never), nfe, 200, tmp_path).samples,
                        exact["gmm2d"]) for nfe in (10, 40)]
    assert errors[1] < 0.25 * errors[0] and errors[1] < 0.02, errors


def test_momentum_with_beta_one_is_the_base_solver(denoisers):
    model = denoisers["gmm2d"]
    sigmas = [80.0, 20.0, 5.0, 1.0, 0.2, 0.002, 0.0]
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 80.0
    assert torch.allclose(dpmpp_2m_hb(model, x, sigmas, beta=1.0), dpmpp_2m(model, x, sigmas), rtol=1e-12, atol=1e-12)
    assert torch.allclose(plms_ghvb(model, x, sigmas, beta=1.0), plms_hb(model, x, sigmas, beta=1.0),
                          rtol=1e-12, atol=1e-12)
    assert not torch.allclose(plms_hb(model, x, sigmas, beta=0.8), plms_hb(model, x, sigmas, beta=1.0))


def test_dc_solver_with_unit_ratios_is_unipc(denoisers):
    model = denoisers["gmm2d"]
    sigmas = [80.0, 20.0, 5.0, 1.0, 0.2, 0.002, 0.0]
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 80.0
    unit = {"ratios": [1.0] * 6, "times": sigmas[:-1]}
    assert torch.equal(dc_solver(model, x, sigmas, prepared=unit), unipc(model, x, sigmas, order=3, variant="bh1"))


def test_dpm_solver_v3_with_degenerate_statistics_is_dpm_solver_pp(denoisers):
    """l = 1, s = b = 0 turns DPM-Solver-v3 into DPM-Solver++; its first order is DDIM (= euler).
    The tolerance is the trapezoid rule's on the integration grid."""
    model = denoisers["gmm2d"]
    stats = empirical_model_statistics(model, None, 0, num_samples=8, grid_points=80)
    stats.update(l=torch.ones_like(stats["l"]), s=torch.zeros_like(stats["s"]), b=torch.zeros_like(stats["b"]))
    grid = _Tables(stats, torch.float64, "cpu")
    sigmas = [grid.sigma(i) for i in range(0, len(grid.lambdas), 79)] + [0.0]
    x = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80.0
    v3 = dpm_solver_v3(model, x, sigmas, prepared=stats, order=1, use_corrector=False)
    assert torch.allclose(v3, euler(model, x, sigmas), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize(
    "model_id, method_spec, base_spec, nfe",
    [
        ("gmm2d", spec("dpm_solver_v3", {"kind": "logsnr_uniform"}), spec("dpmpp_2m", {"kind": "logsnr_uniform"}), 8),
        ("gmm2d", spec("dc_solver", {"kind": "logsnr_uniform"}),
         spec("unipc", {"kind": "logsnr_uniform"}, order=3, variant="bh1"), 6),
        ("gmm2d", spec("dpmpp_2m_hb", beta=0.8), spec("dpmpp_2m"), 8),
        ("gmm2d", spec("plms_hb", beta=0.8), spec("plms_hb", beta=1.0), 6),
        ("digits-ideal", spec("plms_hb", beta=0.8), spec("plms_hb", beta=1.0), 8),
        ("digits-ideal", spec("plms_ghvb", beta=0.8), spec("plms_hb", beta=1.0), 8),
    ],
    ids=["v3-vs-dpmpp_2m", "dc-vs-unipc", "hb-vs-dpmpp_2m", "hb-vs-plms-gmm2d", "hb-vs-plms-digits", "ghvb-vs-plms-digits"],
)
def test_beats_base_solver_at_low_nfe(denoisers, exact, tmp_path, model_id, method_spec, base_spec, nfe):
    n = len(exact[model_id])
    method_err = rms_distance(run(denoisers, model_id, method_spec, nfe, n, tmp_path).samples, exact[model_id])
    base_err = rms_distance(run(denoisers, model_id, base_spec, nfe, n, tmp_path).samples, exact[model_id])
    assert method_err < base_err, (method_err, base_err)
