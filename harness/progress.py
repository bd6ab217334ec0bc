"""Per-batch progress with throughput and ETA (tqdm, on stderr: the terminal for `stepbench` commands, the job's
log under Snakemake), for long work done in batches: sampling a cell, extracting features, embedding captions.
Work of a few batches shows nothing, so the default grid's logs stay short."""

from __future__ import annotations

MIN_BATCHES = 5


def batch_progress(batches: int, desc: str):
    """A progress bar over `batches` steps; call .update(1) per batch and .close() at the end."""
    from tqdm import tqdm

    return tqdm(total=batches, unit="batch", desc=desc, disable=batches < MIN_BATCHES, mininterval=2.0)


def shows_progress(batches: int) -> bool:
    """Whether work of `batches` batches shows progress (for a library's own bar: torch-fidelity's `verbose`)."""
    return batches >= MIN_BATCHES
