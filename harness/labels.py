"""Paired, balanced class labels: sample i's label depends only on (seed, i).

Each block of `num_classes` consecutive samples holds every class once, in an order drawn from (seed, block),
so a cell of any size is balanced to within one sample per class, every method of a model gives sample i the
same label, and a label does not depend on the batch the sample is drawn in.
"""

from __future__ import annotations

import numpy as np

LABEL_STREAM = 0x6C61  # keeps the labels' random stream apart from any other use of (seed, block)


def sample_labels(seed: int, indices, num_classes: int) -> np.ndarray:
    """int64 labels of the samples `indices` of a cell seeded with `seed`."""
    indices = np.asarray(list(indices), dtype=np.int64)
    out = np.empty(len(indices), dtype=np.int64)
    blocks: dict[int, np.ndarray] = {}
    for k, i in enumerate(indices):
        block = int(i) // num_classes
        if block not in blocks:
            blocks[block] = np.random.default_rng([seed, block, LABEL_STREAM]).permutation(num_classes)
        out[k] = blocks[block][int(i) % num_classes]
    return out
