"""CMMD equals a straightforward computation on the same CLIP features: the kernel means written out as loops
over pairs in numpy, both on random embeddings and end to end through the metric on a tiny open-clip model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
from test_clip_clap import TINY_CLIP, clip_checkpoint, colour_images, write_cell  # noqa: E402,F401  (fixture)

from harness.evaluate import evaluate_cell  # noqa: E402
from harness.metrics import METRICS  # noqa: E402
from harness.metrics.cmmd import mmd  # noqa: E402
from harness.metrics.features import data_to_uint8_rgb  # noqa: E402


def reference_cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> float:
    """1000 x (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)), every pair visited once by hand."""
    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))

    def mean(a, b):
        return sum(k(p, q) for p in a for q in b) / (len(a) * len(b))

    return 1000.0 * (mean(x, x) + mean(y, y) - 2 * mean(x, y))


def unit_rows(rows, dim, seed, shift=0.0):
    x = np.random.default_rng(seed).normal(size=(rows, dim)) + shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mmd_equals_the_pairwise_loops():
    x, y = unit_rows(7, 5, 0), unit_rows(9, 5, 1, shift=0.7)
    assert mmd(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(reference_cmmd(x, y), rel=1e-10)
    assert mmd(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(0.0, abs=1e-12)
    assert reference_cmmd(x, y) > 0 and not METRICS.get("cmmd").higher_is_better


def test_cmmd_metric_equals_the_reference_on_the_same_clip_features(tmp_path, clip_checkpoint):
    from harness.metrics.clip_score import embed_images, load_clip

    samples = np.concatenate([colour_images()] * 2)
    reference = data_to_uint8_rgb(np.random.default_rng(3).uniform(-1, 1, (6, 3, 12, 16)).astype(np.float32))
    np.savez(tmp_path / "ref.npz", images=reference.numpy())
    spec = {"clip": {"model": TINY_CLIP, "pretrained": str(clip_checkpoint)},
            "reference_data": {"kind": "npz_images", "path": str(tmp_path / "ref.npz")}}
    out = evaluate_cell(write_cell(tmp_path / "cell", "tiny", samples), spec, {}, ["cmmd"], tmp_path / "cache")
    clip = load_clip(TINY_CLIP, str(clip_checkpoint))
    x = embed_images(clip, data_to_uint8_rgb(samples)).double().numpy()
    y = embed_images(clip, reference).double().numpy()
    assert out["cmmd"] == pytest.approx(reference_cmmd(x, y), rel=1e-6)
    assert out["provenance"]["cmmd"]["num_reference"] == 6
