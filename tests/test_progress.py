"""Long work in batches shows per-batch progress with throughput and ETA on stderr (the job's log under
Snakemake); work of a few batches shows nothing."""

from __future__ import annotations

import re

import torch

from harness.cells import run_cell
from harness.config import load_methods, load_models
from harness.metrics import cleanfid_backend
from harness.metrics.text_alignment import embed_in_batches

RATE = re.compile(r"(batch/s|s/batch)")  # tqdm's throughput, beside its elapsed<remaining ETA


def test_a_cell_of_many_batches_shows_sampling_progress(tmp_path, capsys):
    models, methods = load_models("models.yaml"), load_methods("methods.yaml")
    run_cell("gmm2d", models["gmm2d"], "euler", methods["euler"], 4, tmp_path / "many", num_samples=60, batch_size=10)
    err = capsys.readouterr().err
    assert "sampling" in err and "6/6" in err and RATE.search(err) and "<" in err
    run_cell("gmm2d", models["gmm2d"], "euler", methods["euler"], 4, tmp_path / "few", num_samples=20, batch_size=10)
    assert "sampling" not in capsys.readouterr().err


def test_feature_extraction_and_embedding_show_progress(capsys):
    images = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    features = cleanfid_backend.extract_features(images, None, batch_size=1,
                                                 model=lambda batch: batch.flatten(1).mean(1, keepdim=True))
    assert features.shape == (5, 1)
    err = capsys.readouterr().err
    assert "features (clean-fid)" in err and "5/5" in err and RATE.search(err)
    embedded = embed_in_batches(12, 2, lambda start, stop: torch.arange(start, stop, dtype=torch.float32)[:, None])
    assert embedded[:, 0].tolist() == list(range(12))
    err = capsys.readouterr().err
    assert "embedding" in err and "6/6" in err
    embed_in_batches(4, 2, lambda start, stop: torch.zeros(stop - start, 1))
    assert "embedding" not in capsys.readouterr().err
