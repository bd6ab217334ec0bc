"""Peak memory of one piece of work (a cell: its model, data and activations), not of the process running it.

A worker process runs many jobs (harness.worker), so the process's lifetime peak (ru_maxrss) would carry
an earlier job's peak, and its resident libraries depend on which jobs it ran before. On the CPU the figure
is therefore the peak resident set during the work above the resident set at its start, after returning
freed heap to the system (glibc's malloc_trim), on Linux where the peak can be reset (/proc/self/clear_refs,
VmHWM). On CUDA it is torch's peak of allocated memory during the work.
"""

from __future__ import annotations

import ctypes
import resource
from functools import lru_cache
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """with PeakMemory(device) as peak: ...; then peak.mb and peak.kind."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.mb = float("nan")
        self.kind = ""

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        _return_freed_heap()
        self.resettable = _reset_peak_rss()
        self.start_kb = _status_kb("VmRSS") if self.resettable else 0.0
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.mb, self.kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
        elif self.resettable:
            self.mb, self.kind = (_status_kb("VmHWM") - self.start_kb) / 1024, "cpu_peak_rss_above_start"
        else:  # no resettable peak here: the process's lifetime peak, libraries included
            self.mb, self.kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss_process"


def _return_freed_heap() -> None:
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def _reset_peak_rss() -> bool:
    try:
        CLEAR_REFS.write_text("5")  # 5: reset the peak resident set size to the current one (Linux >= 4.0)
        return True
    except OSError:
        return False


def _status_kb(field: str) -> float:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise OSError(f"{STATUS} has no {field}")
