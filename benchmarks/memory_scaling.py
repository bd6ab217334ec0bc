"""Does a job's memory grow with the number of samples? Peak RSS of sample, reference and evaluate jobs for N
and 10 N samples, each in a fresh process (the kernel's ru_maxrss of that child, libraries included).

A cell streams its batches to disk as they finish and the metrics read it back in blocks, so 10x the samples
should cost little more memory. The model is a small random UNet2DModel at 3x32x32 (CIFAR's shape: a sample
is 12 KB, so 10k samples are 123 MB, enough to show in the peak), saved locally and loaded through the
diffusers adapter; the metric is mse_ref against its own reference solution.

    python benchmarks/memory_scaling.py [--samples 1000] [--nfe 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STEPBENCH = str(Path(sys.executable).with_name("stepbench"))


def tiny_unet(folder: Path) -> None:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8).save_pretrained(folder)
    DDPMScheduler(beta_schedule="linear").save_config(folder)


def peak_rss_mb(argv: list[str], cwd: Path) -> float:
    """Peak resident set of one command's process (Linux reports KiB)."""
    env = {**os.environ, "STEPBENCH_WORKERS": "0", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--nfe", type=int, default=4)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="stepbench-memory-"))
    try:
        tiny_unet(scratch / "unet")
        models = {"tiny-unet": {
            "adapter": "diffusers_unet", "source": str(scratch / "unet"), "batch_size": 250,
            "process": {"kind": "vp_discrete", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                        "num_train_timesteps": 1000},
            "metrics": ["mse_ref"], "reference": {"method": "dpmpp_2m", "nfe": 2 * args.nfe}}}
        (scratch / "models.yaml").write_text(yaml.safe_dump(models))
        shutil.copy(REPO / "methods.yaml", scratch / "methods.yaml")
        peaks: dict[str, list[float]] = {}
        for n in (args.samples, 10 * args.samples):
            common = ["--cache-dir", str(scratch / f"cache{n}")]
            cell = str(scratch / f"cell{n}")
            jobs = {
                "sample": ["sample", "--model", "tiny-unet", "--method", "euler", "--nfe", str(args.nfe), "--out", cell,
                           "--num-samples", str(n), *common],
                "reference": ["reference", "--model", "tiny-unet", "--kind", "solver", "--num-samples", str(n), *common],
                "evaluate": ["evaluate", cell, *common],
            }
            for kind, argv in jobs.items():
                peaks.setdefault(kind, []).append(peak_rss_mb([STEPBENCH, *argv], scratch))
        print(f"peak RSS (MB), tiny UNet 3x32x32, {args.samples} vs {10 * args.samples} samples:")
        for kind, (small, large) in peaks.items():
            print(f"  {kind:<10} {small:8.1f} {large:8.1f}  ratio {large / small:.3f}")
        print(f"memory_ratio_10x={max(large / small for small, large in peaks.values()):.3f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
