"""Quantised versus full-precision network time on this CPU, side by side in one run.

A mid-size class-conditional UNet2DModel (random weights; 32x32x3, block channels 128/256, two
layers per block, attention at the second level), batch 16, 2 threads by default. digits-unet is
too small for kernels to matter. Timed, after warm-up (compilation and two calls) is excluded, in
interleaved rounds so that a busy neighbour slows every variant alike (median per variant):

  fp32 eager | fp32 compiled | fp32 compiled + freezing | w8 compiled | w8a8 compiled + freezing

w8a8 is harness.quantization's PT2E path (calibrated on random inputs at uniform time steps: the
weights are random too, so this measures speed, not quality); w8 is torchao Int8WeightOnlyConfig.
Prints each median (wall clock; process CPU time beside it), the relative output error against fp32
eager, model sizes, the kernels the w8a8 graph ran, and last `speedup_w8a8=X` (compiled fp32 /
w8a8). When that is under 2 (or with --profile) it prints where the time goes: torch.profiler's top
operators of both compiled graphs.

    python benchmarks/quantization_speed.py [--batch 16] [--threads 2] [--rounds 10] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from harness.quantization import calibration_timesteps, fp32_size_bytes, quantize
from harness.quantization.base import TensorNet


def mid_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=2, num_class_embeds=10).eval()


def profile(name, fn, n=3):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    print(f"\n--- where the time goes: {name} ({n} calls) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calibration", type=int, default=8, help="calibration batches (of --batch rows)")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, load average {os.getloadavg()}")

    net = mid_unet()
    g = torch.Generator().manual_seed(0)
    B = args.batch
    x, t, c = torch.randn(B, 3, 32, 32, generator=g), torch.linspace(10, 990, B), torch.randint(0, 10, (B,), generator=g)
    cal = [(torch.randn(B, 3, 32, 32, generator=g), s, torch.randint(0, 10, (B,), generator=g))
           for s in calibration_timesteps("uniform", 1000, args.calibration, 0)]
    print(f"UNet2DModel 128/256, {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters")

    eager = TensorNet(net)
    compiled = torch.compile(TensorNet(net), dynamic=False)
    frozen = torch.compile(TensorNet(net), dynamic=False)
    t0 = time.perf_counter()
    w8 = quantize(net, "w8")
    w8a8 = quantize(net, "w8a8", cal, batch_size=B)
    print(f"quantize (w8 + w8a8 export/calibration/convert): {time.perf_counter() - t0:.1f} s")
    variants = {
        "fp32 eager": lambda: eager(x, t, c),
        "fp32 compiled": lambda: compiled(x, t, c),
        "fp32 compiled+freezing": lambda: _frozen(frozen, x, t, c),
        "w8 compiled": lambda: w8(x, t, c),
        "w8a8 compiled+freezing": lambda: w8a8(x, t, c),
    }
    outs = {}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up: compilation and two calls, not timed
            t0 = time.perf_counter()
            outs[name] = fn()
            fn()
            print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s")
        times = {name: [] for name in variants}
        cpu = {name: [] for name in variants}  # process CPU time: less sensitive to a neighbour taking turns on the cores
        for _ in range(args.rounds):
            for name, fn in variants.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    ref = outs["fp32 eager"]
    med = {name: statistics.median(v) for name, v in times.items()}
    med_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    print(f"\n{'variant':<24} {'median ms':>10} {'min ms':>8} {'cpu ms':>8} {'rel err':>9}")
    for name in variants:
        err = ((outs[name] - ref).norm() / ref.norm()).item()
        print(f"{name:<24} {1e3 * med[name]:>10.1f} {1e3 * min(times[name]):>8.1f} {1e3 * med_cpu[name]:>8.1f} {err:>9.2e}")
    print(f"\nsize: fp32 {fp32_size_bytes(net) / 2**20:.1f} MiB, w8 {w8.size_bytes() / 2**20:.1f} MiB, "
          f"w8a8 {w8a8.size_bytes() / 2**20:.1f} MiB")
    print(f"w8a8 kernels: {w8a8.precision()}")
    print(f"w8 kernels: {w8.precision()}")
    load = os.getloadavg()[0]
    print(f"load average {os.getloadavg()}" + (f" (more than {args.threads} runnable: a neighbour shared these cores, "
                                               f"timings are not clean)" if load > args.threads + 0.5 else ""))
    speedup = med["fp32 compiled"] / med["w8a8 compiled+freezing"]
    print(f"speedup_w8a8 vs fp32 eager={med['fp32 eager'] / med['w8a8 compiled+freezing']:.2f}, "
          f"vs fp32 compiled+freezing={med['fp32 compiled+freezing'] / med['w8a8 compiled+freezing']:.2f}, "
          f"speedup_w8={med['fp32 compiled'] / med['w8 compiled']:.2f}; "
          f"by CPU time: w8a8 {med_cpu['fp32 compiled'] / med_cpu['w8a8 compiled+freezing']:.2f}, "
          f"w8 {med_cpu['fp32 compiled'] / med_cpu['w8 compiled']:.2f}; "
          f"by the fastest round (timeit's advice on a shared machine): "
          f"w8a8 {min(times['fp32 compiled']) / min(times['w8a8 compiled+freezing']):.2f}")
    if speedup < 2 or args.profile:
        profile("fp32 compiled", variants["fp32 compiled"])
        profile("w8a8 compiled+freezing", variants["w8a8 compiled+freezing"])
    print(f"speedup_w8a8={speedup:.2f}")


def _frozen(fn, x, t, c):
    with torch._inductor.config.patch(freezing=True):
        return fn(x, t, c)


if __name__ == "__main__":
    main()
