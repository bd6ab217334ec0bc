"""Paired, balanced class labels (and prompt indices): sample i's label depends only on (seed, i).

Each block of `num_classes` consecutive samples holds every class once, in an order drawn from (seed, block),
so a cell of any size is balanced to within one sample per class, every method of a model gives sample i the
same label, and a label does not depend on the batch the sample is drawn in. `balanced_indices` is that rule
for any count and random stream: text-conditional models draw their captions' indices through it as well
(harness.metrics.text_alignment.prompt_indices).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

LABEL_STREAM = 0x6C61  # keeps the labels' random stream apart from any other use of (seed, block)


def balanced_indices(seed: int, indices, count: int, stream: int) -> np.ndarray:
    """int64 values in 0 .. count - 1 for the samples `indices`: sample i takes entry i mod count of the
    permutation drawn from numpy's default_rng([seed, i // count, stream])."""
    indices = np.asarray(list(indices), dtype=np.int64)
    out = np.empty(len(indices), dtype=np.int64)
    for block in np.unique(indices // count):
        rows = indices // count == block
        out[rows] = _permutation(int(seed), int(block), int(count), int(stream))[indices[rows] % count]
    return out


@lru_cache(maxsize=8)
def _permutation(seed: int, block: int, count: int, stream: int) -> np.ndarray:
    """One block's order, kept for the next batch: COCO's 200k captions cost ms per permutation."""
    order = np.random.default_rng([seed, block, stream]).permutation(count)
    order.flags.writeable = False
    return order


def sample_labels(seed: int, indices, num_classes: int) -> np.ndarray:
    """int64 labels of the samples `indices` of a cell seeded with `seed`."""
    return balanced_indices(seed, indices, num_classes, LABEL_STREAM)
