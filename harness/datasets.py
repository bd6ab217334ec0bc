"""Embedded datasets (shipped with scikit-learn, so nothing is downloaded)."""

from __future__ import annotations

import numpy as np

from harness.errors import ConfigError, valid_names


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as float64 images [N, 1, 8, 8] in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float64) / 8.0 - 1.0  # pixel values are 0..16
    return images[:, None, :, :], bunch.target.astype(np.int64)


DATASETS = {"digits": digits}


def load_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in DATASETS:
        raise ConfigError(f"dataset {name!r} unknown{valid_names(name, DATASETS)}")
    return DATASETS[name]()
