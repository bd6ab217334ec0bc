"""Consistency distillation (harness/training/consistency.py) of a tiny trained teacher: deterministic, cached
under a key that includes the teacher's, saved as a hub consistency checkpoint is, loaded by the same adapter and
sampled by the student family; and the leaderboard's verdict on distillation against the teacher's solvers.

The teacher and the student are trained for a few steps only (the zoo's configs are in models.yaml): what is
tested is the machinery on real trained folders, not the student's quality.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytest.importorskip("diffusers")
from diffusers import CMStochasticIterativeScheduler, UNet2DModel  # noqa: E402

from conftest import REPO  # noqa: E402
from harness.cells import run_cell  # noqa: E402
from harness.config import load_methods, load_models  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.labels import sample_labels  # noqa: E402
from harness.methods.solvers import heun  # noqa: E402
from harness.models import load_denoiser  # noqa: E402
from harness.report.findings import distillation_versus_solvers  # noqa: E402
from harness.training import train_model, trained_folder  # noqa: E402
from harness.training.consistency import heun_step  # noqa: E402
from test_neural_zoo import tiny_models  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SHORT = {"steps": 5, "batch_size": 12, "levels": 6, "warmup_steps": 2}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def student_models(tmp_path, **config):
    """The tiny zoo of test_neural_zoo with digits-student distilled for a few steps."""
    path = tiny_models(tmp_path, steps=4)
    models = yaml.safe_load(path.read_text())
    models["digits-student"]["train"]["config"] = {**SHORT, **config}
    models["digits-student"]["num_samples"] = 20
    path.write_text(yaml.safe_dump(models))
    return path


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    root = tmp_path_factory.mktemp("student")
    models = load_models(student_models(root))
    folder = train_model("digits-student", models, root / "cache")  # trains the teacher first
    return root, models, folder


def test_distillation_is_deterministic_cached_and_keyed_by_its_teacher(distilled, tmp_path):
    root, models, folder = distilled
    record = json.loads((folder / "trained.json").read_text())
    assert record["teacher"] == "digits-unet" and record["steps"] == SHORT["steps"]
    assert np.isfinite(record["final_loss"])
    again = load_models(student_models(tmp_path))
    retrained = train_model("digits-student", again, tmp_path / "cache")
    assert retrained.name == folder.name
    assert (retrained / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()  # bit-identical weights
    stamp = (folder / "trained.json").stat().st_mtime_ns
    assert train_model("digits-student", models, root / "cache") == folder  # cached: not distilled again
    assert (folder / "trained.json").stat().st_mtime_ns == stamp
    # another teacher is another student, with the student's own section unchanged
    edited = yaml.safe_load(student_models(tmp_path).read_text())
    edited["digits-unet"]["train"]["config"]["lr"] = 1e-3
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    assert trained_folder(tmp_path, load_models(tmp_path / "edited.yaml")["digits-student"]).name != folder.name


def test_the_student_starts_from_the_teacher_and_moves(distilled):
    """Initialised from the teacher's weights (the same architecture and class embeddings), then trained."""
    root, models, folder = distilled
    teacher = UNet2DModel.from_pretrained(trained_folder(root / "cache", models["digits-unet"]))
    student = UNet2DModel.from_pretrained(folder)
    def architecture(unet):
        return {k: v for k, v in unet.config.items() if k != "_name_or_path"}

    assert architecture(student) == architecture(teacher)
    moved = [not torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters())]
    assert any(moved)


def test_the_student_is_stored_as_a_hub_consistency_checkpoint(distilled):
    root, models, folder = distilled
    config = CMStochasticIterativeScheduler.load_config(folder)
    assert config["_class_name"] == "CMStochasticIterativeScheduler"
    assert config["num_train_timesteps"] == SHORT["levels"]
    process = models["digits-student"]["process"]
    assert (config["sigma_min"], config["sigma_max"]) == (process["sigma_min"], process["sigma_max"])
    denoiser = load_denoiser(models["digits-student"], "cpu", root / "cache", "digits-student")
    assert denoiser.info.prediction == "x0" and denoiser.info.num_classes == 10
    consistency = denoiser.info.extra["consistency"]
    # the boundary condition f(x, sigma_min) = x, clamped to the data range (clip_denoised)
    x = 1.5 * torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    assert torch.allclose(denoiser(x, consistency.sigma_min, labels), x.clamp(-1, 1), atol=1e-6)


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_the_trained_student_samples_by_the_consistency_procedure(distilled, tmp_path, nfe):
    root, models, _ = distilled
    methods = load_methods(REPO / "methods.yaml")
    run = dict(cache_dir=root / "cache", models=models)
    cell = run_cell("digits-student", models["digits-student"], "consistency", methods["consistency"], nfe,
                    tmp_path / "a", 20, batch_size=20, **run)
    assert cell["status"] == "ok" and cell["nfe_measured"] == nfe and cell["gflops_per_sample"] > 0
    with np.load(tmp_path / "a" / "samples.npz") as data:
        samples = data["samples"]
        assert np.array_equal(data["labels"], sample_labels(0, range(20), 10))
    assert samples.shape == (20, 1, 8, 8) and np.isfinite(samples).all() and np.abs(samples).max() <= 1
    run_cell("digits-student", models["digits-student"], "consistency", methods["consistency"], nfe, tmp_path / "b",
             20, batch_size=7, **run)
    assert np.array_equal(np.load(tmp_path / "b" / "samples.npz")["samples"], samples)  # paired, batch-independent


def test_the_teacher_step_is_one_heun_step_of_the_solver_zoo(distilled):
    """The trainer's batched Heun step (a level per row) equals stepbench's EDM-checked heun solver run row by row
    from the row's level to the next."""
    root, models, _ = distilled
    teacher = load_denoiser(models["digits-unet"], "cpu", root / "cache", "digits-unet")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=generator) * 5
    s_from, s_to = torch.tensor([80.0, 10.0, 1.0, 0.1]), torch.tensor([40.0, 3.0, 0.5, 0.02])
    labels = torch.tensor([0, 3, 7, 10])  # 10: the null class
    with torch.no_grad():
        batched = heun_step(teacher, x, s_from, s_to, labels)
        for i in range(4):
            row = heun(lambda x, s: teacher(x, s, labels[i:i + 1]), x[i:i + 1], [float(s_from[i]), float(s_to[i])])
            assert torch.allclose(batched[i:i + 1], row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["digits-student"]["train"]["config"].update(levls=4), "digits-student.train.config.levls"),
    (lambda m: m["digits-student"]["train"]["config"].update(distance="l1"), "distance"),
    (lambda m: m["digits-student"]["train"].pop("teacher"), "needs a teacher"),
    (lambda m: m["digits-student"].update(process={"kind": "edm", "sigma_min": 0.002, "sigma_max": 80.0}),
     "leaves the teacher digits-unet's range"),
])
def test_bad_distillation_configs_are_one_line(distilled, tmp_path, edit, message):
    root, _, _ = distilled
    models = yaml.safe_load(student_models(tmp_path).read_text())
    edit(models)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(models))
    with pytest.raises(ConfigError, match=message):
        train_model("digits-student", load_models(tmp_path / "bad.yaml"), root / "cache")


# ---- the leaderboard's verdict, on constructed results ----

MODELS = {"digits-unet": {"train": {"trainer": "diffusion_unet"}},
          "digits-student": {"train": {"trainer": "consistency_distillation", "teacher": "digits-unet"}}}


def results(rows):
    """results.csv rows (model, method, family, nfe, fid)."""
    return pd.DataFrame([{"model": m, "method": k, "family": f, "nfe": n, "metric": "fid", "value": v,
                          "status": "ok", "guidance": None} for m, k, f, n, v in rows])


def test_distillation_verdict_says_whether_the_student_beats_every_solver():
    teacher = [("digits-unet", "euler", "solver", 1, 2.4), ("digits-unet", "dpmpp_2m", "solver", 1, 2.5),
               ("digits-unet", "euler", "solver", 2, 2.4), ("digits-unet", "dpmpp_2m", "solver", 2, 1.9),
               ("digits-unet", "euler", "solver", 4, 0.5)]
    wins = distillation_versus_solvers(results(teacher + [("digits-student", "consistency", "student", 1, 1.5),
                                                          ("digits-student", "consistency", "student", 2, 1.2),
                                                          ("digits-student", "consistency", "student", 4, 0.9)]),
                                       MODELS)
    assert len(wins) == 1 and wins[0].verdict.startswith("distillation beats every training-free solver here")
    assert [row[0] for row in wins[0].rows] == [1, 2]  # NFE <= 2 only
    assert wins[0].rows[1][2] == "dpmpp_2m: 1.9" and wins[0].rows[1][3] == "yes"  # the best solver at that NFE
    loses = distillation_versus_solvers(results(teacher + [("digits-student", "consistency", "student", 1, 1.5),
                                                           ("digits-student", "consistency", "student", 2, 2.0)]),
                                        MODELS)
    assert loses[0].verdict.startswith("distillation does not beat every training-free solver here: at NFE 2")
    undecided = distillation_versus_solvers(results([("digits-unet", "euler", "solver", 4, 0.5),
                                                     ("digits-student", "consistency", "student", 4, 0.9)]), MODELS)
    assert undecided[0].verdict.startswith("not decided")
    # a failed student cell is not a result: the verdict rests on the cells that are ok
    failed = results(teacher + [("digits-student", "consistency", "student", 1, 1.5),
                                ("digits-student", "consistency", "student", 2, 0.1)])
    failed.loc[failed.index[-1], "status"] = "diverged"
    assert distillation_versus_solvers(failed, MODELS)[0].verdict.startswith("distillation beats")
    assert [row[0] for row in distillation_versus_solvers(failed, MODELS)[0].rows] == [1]
