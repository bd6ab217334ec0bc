"""Where a number came from: versions, git commit, device."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("stepbench", "torch", "numpy", "scipy", "torch-fidelity", "diffusers", "clean-fid", "open-clip-torch")


@lru_cache(maxsize=None)
def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@lru_cache(maxsize=None)
def git_commit() -> str | None:
    """Commit of the stepbench checkout (None when installed from a wheel or outside git)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device) -> dict:
    env = {
        "device": device_name(device),
        "packages": package_versions(),
        "git": git_commit(),
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # the GPU slot a workflow job was given
        env["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    if os.environ.get("SLURM_JOB_ID"):  # which cluster job made this, to find its log and accounting
        env["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return env
