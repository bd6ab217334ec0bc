"""Time the FID trace term tr sqrt(S1 S2) for 2048-d features (Inception's pool layer) on this CPU.

Side by side, on the same random covariances (from 4096 x 2048 features, as from 4096 samples):
  - scipy.linalg.sqrtm(S1 @ S2)            (clean-fid, pytorch-fid)
  - numpy eigvals(S1 @ S2)                 (torch-fidelity's fid_statistics_to_metric)
  - torch eigh square root of S1, eigvalsh (the textbook symmetric form)
  - stepbench: reference factor B (Cholesky, cached with the reference statistics) + eigvalsh(B^T S1 B)
Accuracy of each is printed against scipy's. The last line is the method stepbench uses, from scratch
(reference factor included): `sqrtm_2048_seconds=X`. The CPU is shared, so the load average is printed
and each fast method keeps its best of a few runs.

    python benchmarks/matrix_sqrt.py [--skip-slow]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.linalg
import torch

from harness.metrics.frechet import covariance_factor, trace_sqrt_product

DIM, NUM = 2048, 4096


def covariances(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two SPD covariances with a decaying spectrum, like Inception features'."""
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.sqrt(1.0 + np.arange(DIM))
    mix = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0]
    x1 = (rng.standard_normal((NUM, DIM)) * scales) @ mix
    x2 = (rng.standard_normal((NUM, DIM)) * scales * 1.1) @ mix + 0.05 * rng.standard_normal((NUM, DIM)) * scales
    return np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)


def best_of(fn, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-slow", action="store_true", help="skip scipy sqrtm and numpy eigvals (minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    s1, s2 = covariances()
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), scipy {scipy.__version__}, "
          f"numpy {np.__version__}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    results: dict[str, tuple[float, float]] = {}
    if not args.skip_slow:
        results["scipy.linalg.sqrtm(S1 S2)"] = best_of(
            lambda: float(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real), 1)
        results["numpy eigvals(S1 S2) [torch-fidelity]"] = best_of(
            lambda: float(np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum()), 1)

    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)

    def eigh_sqrt() -> float:
        values, vectors = torch.linalg.eigh(t1)
        root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
        return float(torch.linalg.eigvalsh(root @ t2 @ root).clamp(min=0).sqrt().sum())

    results["torch eigh sqrt(S1), eigvalsh"] = best_of(eigh_sqrt, 1)
    factor_s, factor = best_of(lambda: covariance_factor(s2), args.repeats)
    per_cell_s, _ = best_of(lambda: trace_sqrt_product(factor, sigma=s1), args.repeats)
    scratch_s, value = best_of(lambda: trace_sqrt_product(covariance_factor(s2), sigma=s1), args.repeats)
    results["stepbench: Cholesky factor + eigvalsh"] = (scratch_s, value)

    reference = results.get("scipy.linalg.sqrtm(S1 S2)", results["torch eigh sqrt(S1), eigvalsh"])[1]
    for name, (seconds, trace) in results.items():
        print(f"{name:42s} {seconds:8.2f} s   tr sqrt = {trace:.12g}   rel. diff to "
              f"{'scipy' if not args.skip_slow else 'eigh'} {abs(trace - reference) / abs(reference):.2e}")
    print(f"stepbench split: reference factor (once, cached) {factor_s:.2f} s, per cell {per_cell_s:.2f} s")
    print(f"sqrtm_2048_seconds={scratch_s:.2f}")


if __name__ == "__main__":
    main()
