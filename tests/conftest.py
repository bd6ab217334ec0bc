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
