import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def repo_files(tmp_path):
    """Copies of the repo's models.yaml and methods.yaml in a scratch dir (tests may edit them)."""
    for name in ("models.yaml", "methods.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def write_evaluable_cell(cell_dir: Path, samples, arrays: dict | None = None, **cell) -> Path:
    """A cell directory as `stepbench sample` leaves it, for metric tests: samples.npz (with `arrays` beside the
    samples: the conditions a cell records, e.g. prompt_index), and a cell.json that records the samples' sha256
    (evaluate checks it) with the given fields."""
    import json

    import numpy as np

    from harness.files import sha256_file

    cell_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cell_dir / "samples.npz", samples=samples, **(arrays or {}))
    record = {"status": "ok", "seed": 0, "num_samples": len(samples), **cell,
              "samples_sha256": sha256_file(cell_dir / "samples.npz"),
              "provenance": {"config_hash": "test", **cell.get("provenance", {})}}
    (cell_dir / "cell.json").write_text(json.dumps(record))
    return cell_dir
