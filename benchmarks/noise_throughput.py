"""Normals per second: harness.noise's counter-based generator against torch.randn and the per-sample
generators it replaced, side by side in one run.

Contenders, each producing the float32 [samples, elements] draw on the device:
- randn: torch.randn's in-place form on one generator for the whole batch (not batch-independent: the
  speed to aim at);
- per_sample: the previous harness.noise, reproduced here: one CPU torch.Generator per sample, seeded
  from (seed, i) through numpy's SeedSequence, each row filled by its own generator, then moved to the
  device;
- eager, compiled, native: harness.noise.draw on each path (the same numbers); native is harness.noise_native's
  C loop, on a CPU where it builds;
- default: what a sampling job gets from SampleNoise: on a CPU the native loop where it builds, else (and on
  CUDA) eager until its draws have cost about a compile (COMPILE_AFTER_EAGER_SECONDS), then compiled.
A stochastic sampler draws many times from one SampleNoise (`later draw` rows); a deterministic one draws
once per batch, right after building it (`first draw`: construction included, where the per-sample
generators pay numpy's SeedSequence per sample). Sizes: digits-like 250 x 64 and CIFAR-like 500 x 3072, at
1 and 2 intra-op threads, on CPU and on CUDA when present. Each figure is the best of --repeats rounds that
time every contender in turn, so load from other processes hits them alike. The last lines are ratios:
compiled / randn and default / per_sample (the worst over sizes and threads), per device.

    python benchmarks/noise_throughput.py [--repeats 15] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from harness import noise, noise_native
from harness.noise import SampleNoise

SIZES = {"digits": (250, 64), "cifar": (500, 3072)}
SEED = 0


def per_sample_generators(seed: int, indices) -> list[torch.Generator]:
    """The previous SampleNoise's generators: one per sample, seeded from (seed, i)."""
    return [torch.Generator(device="cpu").manual_seed(
        int(np.random.SeedSequence([seed, i]).generate_state(1, dtype=np.uint64)[0] >> 1)) for i in indices]


def per_sample_draw(generators: list[torch.Generator], elements: int, device: torch.device) -> torch.Tensor:
    draws = torch.empty((len(generators), elements), dtype=torch.float32)
    for row, g in zip(draws, generators):
        row.normal_(generator=g)
    return draws.to(device)


def contenders(samples: int, elements: int, device: torch.device) -> dict:
    """name -> a function drawing once (state that a sampler would keep between draws is built here)."""
    indices = range(samples)
    one = torch.Generator(device=device).manual_seed(SEED)
    out = torch.empty((samples, elements), device=device)
    generators = per_sample_generators(SEED, indices)
    keys = torch.tensor(noise.seed_keys(SEED), device=device)
    index = torch.arange(samples, device=device)
    kept = SampleNoise(SEED, indices, device=device)
    return {
        "randn": lambda: out.normal_(generator=one),
        "per_sample later draw": lambda: per_sample_draw(generators, elements, device),
        "per_sample first draw": lambda: per_sample_draw(per_sample_generators(SEED, indices), elements, device),
        "eager": lambda: noise.draw(keys, index, 1, elements, path="eager"),
        "compiled": lambda: noise.draw(keys, index, 1, elements, path="compiled"),
        **({"native": lambda: noise.draw(keys, index, 1, elements, path="native")} if noise_native.available() else {}),
        "default later draw": lambda: kept.randn((elements,), dtype=torch.float32),
        "default first draw": lambda: SampleNoise(SEED, indices, device=device).randn((elements,), dtype=torch.float32),
    }


def best_seconds(functions: dict, repeats: int, device: torch.device) -> dict:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, f in functions.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    # a sampling job of this size would not compile: measure "default" as such a job runs
    noise.COMPILE_AFTER_EAGER_SECONDS = float("inf")

    summary = {}
    print(f"{'device':6} {'size':7} {'threads':>7} {'contender':22} {'M normals/s':>12} {'x randn':>8}")
    for device in devices:
        for name, (samples, elements) in SIZES.items():
            for threads in args.threads:
                torch.set_num_threads(threads)
                functions = contenders(samples, elements, device)
                t0 = time.perf_counter()
                functions["compiled"]()  # compiles (once per process and device)
                first_compiled = time.perf_counter() - t0
                noise._compiled_built = False  # "default" stays a job that has not compiled
                seconds = best_seconds(functions, args.repeats, device)
                rate = {k: samples * elements / s / 1e6 for k, s in seconds.items()}
                for k, r in rate.items():
                    print(f"{device.type:6} {name:7} {threads:7d} {k:22} {r:12.1f} {r / rate['randn']:8.2f}")
                print(f"{device.type:6} {name:7} {threads:7d} {'(first compiled call)':22} {first_compiled:11.2f}s")
                for key, value in {
                    f"compiled_vs_randn_{device.type}": rate["compiled"] / rate["randn"],
                    f"eager_vs_randn_{device.type}": rate["eager"] / rate["randn"],
                    f"compiled_vs_per_sample_{device.type}": rate["compiled"] / rate["per_sample later draw"],
                    **({f"native_vs_randn_{device.type}": rate["native"] / rate["randn"],
                        f"native_vs_per_sample_{device.type}": rate["native"] / rate["per_sample later draw"]}
                       if "native" in rate else {}),
                    f"default_vs_per_sample_{device.type}_first_draw": rate["default first draw"]
                    / rate["per_sample first draw"],
                    f"default_vs_per_sample_{device.type}": rate["default later draw"] / rate["per_sample later draw"],
                }.items():
                    summary.setdefault(key, []).append((value, f"{name}/{threads}t"))
    print("\nratios of normals/s per size/threads; the last lines: the worst of them")
    for key, values in summary.items():
        print(f"{key}: " + "  ".join(f"{where}={value:.2f}" for value, where in values))
    for key in [k for k in summary if k.startswith(("compiled_vs_randn", "native_vs_randn", "default_vs_per_sample"))]:
        value, where = min(summary[key])
        print(f"{key}={value:.2f}  (worst: {where})")


if __name__ == "__main__":
    main()
