"""The flow model kind and the jacobi family in the workflow: a TarFlow entry (an apple/ml-tarflow .pth, or trained
by the workflow) loads through the `tarflow` adapter; cells of tarflow_sequential / tarflow_jacobi /
tarflow_gs_jacobi record sequential passes as NFE and token evaluations as network_evals, counted as the
inversion's pass counter counts them; noise is paired; CRM/IGM is a prepared artifact made once; the grid marks
cells a method cannot sample; the report's findings show the comparison and the per-block CRM/IGM.

Tiny random TarFlows in the digits' data space (1 x 8 x 8, patch 2: T = 16 tokens), float32 as the zoo runs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO
from harness import prepared
from harness.cells import run_cell
from harness.config import load_methods, load_models
from harness.errors import ConfigError, StepbenchError
from harness.grid import expand_grid
from harness.methods import make_sampler
from harness.methods.jacobi_inverse import sequential
from harness.models import load_denoiser
from harness.models.tarflow import TarFlow, save_pretrained
from harness.nfe import CountingDenoiser, PassCounter
from harness.noise import SampleNoise

TINY = {"in_channels": 1, "img_size": 8, "patch_size": 2, "channels": 64, "num_blocks": 2, "layers_per_block": 1,
        "num_classes": 10, "noise_std": 0.1}
K, T = 2, 16
SEQUENTIAL_NFE = K * (T - 1) + K  # the inverse's single-token passes, then the denoising step's one per block


def random_tarflow(seed=0, out_std=0.02) -> TarFlow:
    torch.manual_seed(seed)
    model = TarFlow(**TINY)
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=out_std)
    return model.eval()


@pytest.fixture
def files(tmp_path):
    """models.yaml with one tiny flow saved as apple/ml-tarflow saves it (a pickled state dict), and the repo's
    methods.yaml."""
    path = tmp_path / "mnist_model_2_64_2_1_0.10.pth"
    torch.save(random_tarflow().state_dict(), path)
    entry = {"adapter": "tarflow", "source": str(path), "allow_pickle": True, "params": TINY, "classes": 10,
             "dataset": "digits", "feature_extractor": "digits-cnn", "num_samples": 12, "batch_size": 6,
             "metrics": ["mse_ref", "wall_s_per_sample"], "reference": {"method": "tarflow_sequential",
                                                                       "nfe": SEQUENTIAL_NFE}}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"tiny-flow": entry}))
    return tmp_path, load_models(tmp_path / "models.yaml"), load_methods(REPO / "methods.yaml")


def cell(files, method, nfe, num_samples=12, batch_size=6, **kw):
    root, models, methods = files
    out = root / "cells" / method / f"nfe{nfe}-b{batch_size}"
    record = run_cell("tiny-flow", models["tiny-flow"], method, methods[method], nfe, out, num_samples,
                      batch_size=batch_size, cache_dir=root / "cache", **kw)
    with np.load(out / "samples.npz") as data:
        return record, data["samples"], data["labels"]


def test_an_apple_checkpoint_loads_through_the_adapter(files):
    _, models, _ = files
    flow = load_denoiser(models["tiny-flow"])
    reference = random_tarflow()
    assert all(torch.equal(a, b) for a, b in zip(flow.flow.state_dict().values(), reference.state_dict().values()))
    assert flow.info.num_classes == 10 and flow.budget == (K, T, K)
    with pytest.raises(StepbenchError, match="normalizing flow"):  # not a denoiser
        flow(torch.zeros(1, 1, 8, 8), 1.0)


def test_a_pickled_checkpoint_needs_allow_pickle_in_the_entry(files):
    root, models, _ = files
    spec = {k: v for k, v in models["tiny-flow"].items() if k != "allow_pickle"}
    (root / "models.yaml").write_text(yaml.safe_dump({"tiny-flow": spec}))
    from harness.models import check_model

    with pytest.raises(ConfigError, match="allow_pickle: true") as err:
        check_model(load_models(root / "models.yaml")["tiny-flow"])
    assert "\n" not in str(err.value)


def test_a_flow_entry_has_no_noise_process(files):
    root, models, _ = files
    bad = {"tiny-flow": {**models["tiny-flow"], "process": {"kind": "edm"}}}
    bad["tiny-flow"].pop("train_key", None)
    (root / "models.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="tiny-flow.process': a normalizing flow has no noise process"):
        load_models(root / "models.yaml")


def test_the_sequential_cell_counts_its_passes_and_token_evaluations(files):
    record, samples, labels = cell(files, "tarflow_sequential", SEQUENTIAL_NFE)
    assert record["family"] == "jacobi" and record["status"] == "ok"
    assert record["nfe_measured"] == SEQUENTIAL_NFE
    # per block: tokens 0..T-2 one at a time (T - 1 token evaluations), then the denoising pass over T
    assert record["network_evals"] == K * (T - 1) + K * T
    assert record["evals_by_model"] == {"tiny-flow": K * (T - 1) + K * T}
    assert record["gflops_per_sample"] > 0
    # the same inverse as jacobi_inverse.sequential from the cell's own noise and labels, then the denoising step
    _, models, _ = files
    flow = load_denoiser(models["tiny-flow"])
    z = SampleNoise(0, range(12)).randn((1, 8, 8), dtype=torch.float32)
    y = torch.as_tensor(labels)
    expected = flow.flow.score_denoise(sequential(flow.flow, z, y).x, y)
    assert np.abs(samples - expected.numpy()).max() <= 1e-5
    assert sorted(set(labels.tolist())) == list(range(10))  # balanced class labels, as the other conditional models


def test_samples_depend_only_on_seed_and_index(files):
    _, whole, _ = cell(files, "tarflow_sequential", SEQUENTIAL_NFE, batch_size=12)
    _, halves, _ = cell(files, "tarflow_sequential", SEQUENTIAL_NFE, batch_size=5)
    assert np.abs(whole - halves).max() <= 1e-5


def test_the_counter_audits_what_the_inversions_pass_counter_counts(files):
    _, models, _ = files
    flow = load_denoiser(models["tiny-flow"])
    sampler = make_sampler(files[2]["tarflow_jacobi"])
    z, y = SampleNoise(0, range(4)).randn((1, 8, 8), dtype=torch.float32), torch.arange(4)
    counted = CountingDenoiser(flow)
    with PassCounter(flow.flow.blocks, 4) as hooks:  # every block pass, counted independently of the cell's counter
        sampler.sample(counted, z, K * 10 + K, y)
    assert counted.rows == sum(hooks.rows)
    assert counted.network_rows == sum(hooks.tokens)
    assert K + K <= counted.rows / 4 <= K * 10 + K  # adaptive: at most the budget's cap


def test_jacobi_cells_reach_the_sequential_samples_with_fewer_passes(files):
    root, models, methods = files
    _, exact, _ = cell(files, "tarflow_sequential", SEQUENTIAL_NFE)
    # the random flow's samples leave the reference's clamp [-3, 3] (the digits' do not): no clamp here
    unclamped = {**methods["tarflow_jacobi"], "params": {**methods["tarflow_jacobi"]["params"], "clamp": None}}
    methods["tarflow_jacobi"] = unclamped
    record, samples, _ = cell(files, "tarflow_jacobi", K * (T - 1) + K)  # cap T - 1: converges exactly at worst
    assert record["nfe_measured"] < SEQUENTIAL_NFE
    assert math.sqrt(((samples - exact) ** 2).mean()) <= 1e-5
    capped, _, _ = cell(files, "tarflow_jacobi", K * 2 + K)  # a cap of 2 iterations per block: passes the cap
    assert capped["nfe_measured"] == K * 2 + K


def test_budgets_the_model_cannot_meet_are_unsupported_cells(files):
    _, models, methods = files
    grid = {"models": ["tiny-flow"], "methods": ["tarflow_sequential", "tarflow_jacobi", "euler"], "nfe": [8, 32]}
    cells = {(c.method, c.nfe): c for c in expand_grid(grid, models, methods)}
    assert cells[("tarflow_sequential", 32)].supported
    assert not cells[("tarflow_sequential", 8)].supported
    assert cells[("tarflow_sequential", 8)].reason == f"exact inverse: NFE {SEQUENTIAL_NFE} only"
    assert cells[("tarflow_jacobi", 8)].supported and cells[("tarflow_jacobi", 32)].supported  # 2 x 3 + 2, 2 x 15 + 2
    assert not cells[("euler", 8)].supported
    assert cells[("euler", 8)].reason == "flow model: solver methods sample denoisers"
    guided = expand_grid({**grid, "methods": ["tarflow_sequential"], "nfe": [32], "guidance": [4]}, models, methods)
    assert guided[0].reason == "flow model: no guidance axis yet"
    # and a flow method on a denoiser
    zoo = load_models(REPO / "models.yaml")
    denoiser_cells = expand_grid({"models": ["gmm2d"], "methods": ["tarflow_jacobi"], "nfe": [8]}, zoo, methods)
    assert denoiser_cells[0].reason == "denoiser model: jacobi methods sample flows"


def test_gs_jacobi_prepares_crm_and_igm_once_and_records_its_strategy(files, monkeypatch):
    root, models, methods = files
    spec, method = models["tiny-flow"], methods["tarflow_gs_jacobi"]
    sampler = make_sampler(method)
    with pytest.raises(StepbenchError, match="prepared artifact missing"):
        cell(files, "tarflow_gs_jacobi", 22)
    path = prepared.prepare(sampler, root / "cache", "tiny-flow", spec, "tarflow_gs_jacobi", method, 22)
    from harness.files import load_artifact

    artifact = load_artifact(path)["artifact"]
    assert artifact["images"] == 1000 and len(artifact["metrics"]) == K
    assert artifact["strategy"]["notation"].startswith("[")
    # a second run recomputes nothing, at any budget: one artifact per (model, method)
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(type(sampler), "prepare", lambda *a: pytest.fail("prepared again"))
    assert prepared.prepare(make_sampler(method), root / "cache", "tiny-flow", spec, "tarflow_gs_jacobi", method,
                            42) == path
    assert path.stat().st_mtime_ns == stamp
    record, _, _ = cell(files, "tarflow_gs_jacobi", 22)
    summary = record["prepared"]["summary"]
    assert summary["images"] == 1000 and len(summary["crm"]) == len(summary["igm_z"]) == K
    assert abs(sum(summary["crm_share"]) - 1) < 1e-9
    assert summary["worst_case_passes"] <= 22 and record["nfe_measured"] <= summary["worst_case_passes"]


def test_the_crm_rule_segments_a_tough_block(files):
    """With a factor that makes block 1 tough (share >= 0.6 / 2 for either block), it runs in modules."""
    root, models, methods = files
    method = {**methods["tarflow_gs_jacobi"], "params": {**methods["tarflow_gs_jacobi"]["params"],
                                                          "tough_factor": 0.6, "gs_modules": 4, "tough_max_iter": 3}}
    sampler = make_sampler(method)
    prepared.prepare(sampler, root / "cache", "tiny-flow", models["tiny-flow"], "gs", method, 30)
    prepared.load(sampler, root / "cache", "tiny-flow", models["tiny-flow"], "gs", method, 30)
    strategies = sampler.strategies((K, T, K), 30)
    assert [s.num_gs for s in strategies] == [4, 4] and [s.max_iter for s in strategies] == [3, 3]
    summary = sampler.prepared_summary(sampler.prepared, 30, models["tiny-flow"])
    assert summary["notation"] == "[0/1-4-3--]" and summary["worst_case_passes"] == 2 * 4 * 3 + K
    # a module of T / 4 = 4 tokens is exact after 4 iterations: a larger cap is cut to it
    method["params"]["tough_max_iter"] = 32
    sampler = make_sampler(method)
    prepared.prepare(sampler, root / "cache", "tiny-flow", models["tiny-flow"], "gs", method, 34)
    prepared.load(sampler, root / "cache", "tiny-flow", models["tiny-flow"], "gs", method, 34)
    assert [s.max_iter for s in sampler.strategies((K, T, K), 34)] == [4, 4]


def test_a_workflow_trained_tarflow_loads_and_trains_once(tmp_path):
    from harness.training import train_model

    models = yaml.safe_load((REPO / "models.yaml").read_text())
    entry = models["digits-tarflow"]
    entry["train"]["config"] = {"steps": 3, "batch_size": 8, "warmup_steps": 1,
                                "model": {"channels": 64, "num_blocks": 2, "layers_per_block": 1, "patch_size": 2}}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"digits-tarflow": entry}))
    zoo = load_models(tmp_path / "models.yaml")
    folder = train_model("digits-tarflow", zoo, tmp_path / "cache")
    record = json.loads((folder / "trained.json").read_text())
    assert record["trainer"] == "tarflow" and record["steps"] == 3 and record["num_classes"] == 10
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert train_model("digits-tarflow", zoo, tmp_path / "cache") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    flow = load_denoiser(zoo["digits-tarflow"], cache_dir=tmp_path / "cache", model_id="digits-tarflow")
    assert flow.budget == (2, 16, 2) and flow.info.extra["dataset"] == "digits"


def test_findings_show_the_inversions_beside_the_sequential_one():
    from harness.report.findings import jacobi_strategies, parallel_inversion

    methods = yaml.safe_load((REPO / "methods.yaml").read_text())
    rows = []
    for method, nfe, passes, tokens, wall, mse, fid in [("tarflow_sequential", 256, 256, 508, 0.02, 0.0, 0.3),
                                                        ("tarflow_gs_jacobi", 132, 70.5, 4400, 0.005, 1e-10, 0.3),
                                                        ("tarflow_jacobi", 68, 60, 3800, 0.004, 4e-8, 0.31)]:
        for metric, value in (("wall_s_per_sample", wall), ("mse_ref", mse), ("fid", fid)):
            rows.append({"model": "m", "method": method, "family": "jacobi", "nfe": nfe, "nfe_measured": passes,
                         "network_evals": tokens, "metric": metric, "value": value, "status": "ok", "guidance": 1.0})
    found = parallel_inversion(pd.DataFrame(rows), methods)
    assert len(found) == 1
    table = found[0].rows
    assert [r[0] for r in table] == ["tarflow_sequential", "tarflow_gs_jacobi", "tarflow_jacobi"]
    assert table[1][5] == "4" and table[1][6] == "1e-05"  # speed-up 0.02 / 0.005; RMS sqrt(1e-10)
    assert "tarflow_gs_jacobi at NFE 132" in found[0].verdict and "tarflow_jacobi" not in found[0].verdict  # 2e-4
    assert "4x the sequential speed: faster" in found[0].verdict
    summary = {"notation": "[J-32]", "worst_case_passes": 132, "tough_blocks": [], "guess": ["z", "z"], "images": 1000,
               "crm_share": [0.4, 0.6], "crm": [1.0, 1.5], "igm_z": [0.1, 0.2], "igm_zeros": [1.0, 2.0]}
    strategies = jacobi_strategies({("m", "tarflow_gs_jacobi"): {132: summary}}, methods)
    assert strategies[0].rows[1][:3] == [1, "60.0%", "1.5"] and "[J-32]" in strategies[0].verdict
