"""Where a job's time went: seconds inside network evaluations, metric computations and training.

The harness times those three kinds of useful work where they happen (the NFE counter around every
denoiser call, the metric loop, the training loops); a nested block counts once, in the outermost kind.
With STEPBENCH_LEDGER set to a folder, every stepbench command writes one JSON record there (its wall time
and useful seconds), which benchmarks/grid_efficiency.py adds up over a whole grid.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

KINDS = ("network", "metrics", "training")

_totals = dict.fromkeys(KINDS, 0.0)
_depth = 0


@contextmanager
def timed(kind: str):
    """Count the block's wall time as `kind` unless an enclosing block already counts it."""
    global _depth
    if kind not in _totals:
        raise ValueError(f"accounting kind {kind!r}; valid: {', '.join(KINDS)}")
    _depth += 1
    start = time.perf_counter()
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _totals[kind] += time.perf_counter() - start


def reset() -> None:
    for kind in _totals:
        _totals[kind] = 0.0


def totals() -> dict[str, float]:
    return dict(_totals)


def write_ledger(argv: list[str], wall_s: float, status: int) -> None:
    """One record per command in $STEPBENCH_LEDGER (nothing when it is unset)."""
    folder = os.environ.get("STEPBENCH_LEDGER")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    record = {"command": argv[:1], "argv": argv, "wall_s": wall_s, "status": status, "useful_s": totals(),
              "pid": os.getpid(), "end": time.time()}
    name = f"{time.time_ns()}-{os.getpid()}.json"
    (Path(folder) / name).write_text(json.dumps(record))
