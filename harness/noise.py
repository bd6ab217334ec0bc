"""Paired, batch-independent noise: sample i of a cell depends only on (seed, i).

Definition: a counter-based generator. Every normal is a function of (seed, sample index i, draw index d,
position) alone, so any subset of a cell's samples, in any batch, on any device, gets the same numbers.
The draws of a SampleNoise are numbered: draw 0 is the initial noise, later draws (SDE steps, ancestral
samplers) are 1, 2, ...; a draw of n elements per sample is ceil(n/2) Box-Muller pairs p.
- counter c = i << 40 | d << 24 | p (injective for i, p < 2^24 and d < 2^16; refused beyond),
- keys (k1, k2) = the first two outputs of splitmix64 seeded with `seed`,
- h = mix(mix(c ^ k1) ^ k2), mix being splitmix64's finalizer: for one seed a bijection of the counter,
  so no two pairs of a seed share their 64 bits,
- u1 = (h_hi + 1) / 2^32 in (0, 1], u2 = h_lo / 2^32 (the 32-bit halves); r = sqrt(-2 ln u1),
  element p = r cos(2 pi u2), element ceil(n/2) + p = r sin(2 pi u2) (the last sin left out for odd n);
  float32 numbers, then cast to the requested dtype.

Exactness. ln and cos are evaluated in int64 fixed point (ln: range reduction by the float64 exponent, a
128-entry table, a short series; cos: quadrants, a Taylor polynomial), the square root is IEEE float64
sqrt (correctly rounded, so one answer), and the two products r cos, r sin are single roundings followed
by the rounding to float32. Every other float operation is exact (int64 < 2^53 to float64, the exponent
and fraction read from the float64 bits, scaling by powers of two). No libm/Sleef/MKL/libdevice routine
is involved (their last ulps differ between implementations), and nothing is left that a compiler could
fuse into an FMA (an addition after a multiplication). Hence, by construction and tested:
- byte-identical across batch sizes, index sets, thread counts and positions in a vectorised loop
  (tests/test_noise.py: batches 1, 7, 64, samples 3..9 of a cell, offsets 1..7);
- eager (plain torch ops) and compiled (torch.compile: C++ on CPU, Triton on CUDA) byte-identical, so
  which of them runs is a matter of cost only (tested on a 2M-element draw);
- CPU and CUDA byte-identical (tested where CUDA is present: marked gpu). This rests on int64 arithmetic
  wrapping on overflow (it does in ATen, the inductor C++ and Triton), on >> being arithmetic (masked
  where a logical shift is meant) and on sqrt being IEEE on CUDA (it is in CUDA and Triton's sqrt_rn).
Found while building it: ATen's eager float64 sqrt on CPU is not correctly rounded (0.6% of inputs one
ulp off numpy's and the compiled kernel's), so the eager path on CPU takes numpy's; its float64 log and
cos differ from the compiled kernel's (Sleef) in 3% and 2% of inputs, which is why they are not used: a
float64 Box-Muller through them would leave eager and compiled about 1e-10 of elements one float32 ulp
apart, and CPU and CUDA likewise.

Accuracy against Box-Muller computed in float64 from the same (u1, u2): |ln u1| within 2^-40,
cos and sin within 2^-29, so |z - exact| < 2^-26 (1/8 float32 ulp at |z| = 1; tested). |z| <= 6.66
(u1 >= 2^-32); z and -z are exactly equally likely. tests/test_noise.py also checks moments, a KS test
against N(0, 1) on 10^6 draws, correlations between neighbouring samples, draws and elements, and that
distinct (seed, i) and (seed, i, draw) give distinct streams.

Paths, all giving these numbers (tests/test_noise.py checks them byte for byte):
- native (harness.noise_native): the definition as one C loop, built once per machine by the system's C
  compiler, vectorised (AVX-512/AVX2 chosen at load). The default on a CPU wherever it builds.
- eager: plain torch ops, ~160 of them per draw (~0.35 ms of dispatch per draw, a memory pass per op).
- compiled: torch.compile of the same function (C++ on CPU, Triton on CUDA). On CUDA the default switches to it
  once eager draws have cost about a compile (ski rental, below); on a CPU without a C compiler likewise.
Cost (benchmarks/noise_throughput.py, one CPU thread, normals/s against torch.randn on one generator): native
0.85x (on a loaded machine; 1.4x quiet) at digits size (250 x 64) and 1.7x at CIFAR size (500 x 3072), 1.9x the
old per-sample generators or more; torch.compile 0.24x and 1.3x (its guards and wrapper dominate small draws);
eager 0.06x and 0.09x.
"""

from __future__ import annotations

import math
import time
import warnings
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from functools import cache

import numpy as np
import torch

# Names the definition above. It is part of every cell's and every reference solution's cache key, so that
# results from other noise are recomputed, not reused: change it whenever the numbers change.
NOISE_VERSION = "splitmix64-pairs-fixed-point-box-muller/1"
SAMPLE_BITS, DRAW_BITS, PAIR_BITS = 24, 16, 24
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores (constants above 2^63 as their signed equivalents)."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


GOLDEN_GAMMA = 0x9E3779B97F4A7C15
MIX_MULTIPLIERS = (_signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB))


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 bit patterns (masks make the right shifts logical)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * MIX_MULTIPLIERS[0]
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * MIX_MULTIPLIERS[1]
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _mix_int(z: int) -> int:
    """The same finalizer on a Python int (for the keys, computed once per SampleNoise)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def seed_keys(seed: int) -> tuple[int, int]:
    """(k1, k2): the first two outputs of splitmix64 seeded with `seed`, as int64 values."""
    state = seed & MASK64
    return tuple(_signed(_mix_int((state + n * GOLDEN_GAMMA) & MASK64)) for n in (1, 2))


# ---- fixed-point constants (exact: integer arithmetic and correctly rounded decimal ln) ----

TABLE_BITS = 7  # ln's range reduction: 128 intervals of the mantissa [1, 2)


def _round(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_EVEN))


def _log_tables() -> tuple[list[int], list[int]]:
    """recip[k] = 2^30 / (1 + (k + 1/2)/128) rounded, the reciprocal of interval k's midpoint (Q30), and
    ln_offset[k] = ln(2^30 / recip[k]) (Q44): ln m = ln_offset[k] + ln(1 + y) for y = m recip[k] / 2^30 - 1,
    |y| <= 2^-8, whatever recip[k]'s rounding."""
    n = 1 << TABLE_BITS
    recip = [((1 << 39) // (2 * n + 2 * k + 1) + 1) // 2 for k in range(n)]  # round(2^38 / (2n + 2k + 1))
    with localcontext() as ctx:
        ctx.prec = 40
        ln_offset = [_round((Decimal(1 << 30) / r).ln() * (1 << 44)) for r in recip]
    return recip, ln_offset


with localcontext() as _ctx:
    _ctx.prec = 40
    LN2_Q56 = _round(Decimal(2).ln() * (1 << 56))
# ln(1 + y) = y + y^2 (-1/2 + y/3 - y^2/4 + y^3/5) in Q30, |y| <= 2^-8 (next term below 2^-50)
LOG1P_Q30 = [-(1 << 29), ((1 << 31) // 3 + 1) // 2, -(1 << 28), ((1 << 31) // 5 + 1) // 2]
PI_Q30 = round(math.pi * 2**30)  # math.pi * 2^30 = 3373259426.13: the rounding is not in doubt
# cos x = sum_j COS_Q31[j] t^j in Q31 for t = (x/2)^2, 0 <= x <= pi/2: the Taylor coefficients 4^j / (2j)!
# with their signs (the first term left out is below 2^-33)
COS_Q31 = [(-1) ** j * ((4**j << 32) // math.factorial(2 * j) + 1) // 2 for j in range(8)]


@cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor(values, dtype=torch.int64, device=device) for values in _log_tables())


# ---- the normal as a function of the counter, in int64 fixed point ----


def _horner(t: torch.Tensor, coefficients: list[int], frac_bits: int) -> torch.Tensor:
    p = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        p = c + ((t * p) >> frac_bits)
    return p


def _minus_log_u1(high: torch.Tensor, recip: torch.Tensor, ln_offset: torch.Tensor) -> torch.Tensor:
    """-ln u1 for u1 = (high + 1) / 2^32, in Q44 (>= 0)."""
    n = high + 1  # n = 2^exponent m, 1 <= m < 2, read exactly from n's float64 bits (n < 2^53)
    bits = n.to(torch.float64).view(torch.int64)
    exponent = (bits >> 52) - 1023
    mantissa = (bits >> 20) & MASK32  # m's 32 fraction bits (n has at most 33 significant bits)
    k = mantissa >> (32 - TABLE_BITS)
    y = (mantissa + (1 << 32)) * recip[k] - (1 << 62)  # y = m recip[k] - 1 in Q62: below 2^63
    y_sq = ((y >> 26) * (y >> 26)) >> 28  # Q44
    log1p_y = (y >> 18) + ((y_sq * _horner(y >> 32, LOG1P_Q30, 30)) >> 30)
    log_mantissa = ln_offset[k] + log1p_y
    return (((32 - exponent) * LN2_Q56) >> 12).sub_(log_mantissa).clamp_min_(0)


def _cos_quadrant(within: torch.Tensor) -> torch.Tensor:
    """cos x in Q31 for x = within pi / 2^31, 0 <= within <= 2^30 (x in [0, pi/2])."""
    half_x = (within * PI_Q30) >> 31  # x/2 = within pi / 2^32, in Q31
    return _horner((half_x * half_x) >> 31, COS_Q31, 31)


def _cos_sin(angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos t and sin t in Q31 for t = 2 pi angle / 2^32, by quadrants: with x = t - quadrant pi/2 in [0, pi/2),
    each is +-cos x or +-cos(pi/2 - x)."""
    quadrant = angle >> 30
    within = angle & ((1 << 30) - 1)
    a, b = _cos_quadrant(within), _cos_quadrant((1 << 30) - within)
    swap = (a ^ b) & -(quadrant & 1)  # quadrants 1, 3: cos t = -+cos(pi/2 - x), sin t = +-cos x
    cos_negative = -(((quadrant + 1) >> 1) & 1)  # quadrants 1, 2
    sin_negative = -(quadrant >> 1)  # quadrants 2, 3
    return ((a ^ swap) ^ cos_negative) - cos_negative, ((b ^ swap) ^ sin_negative) - sin_negative


def _ieee_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float64 square root. torch.sqrt is on CUDA and when compiled (C++ std::sqrt and
    _mm512_sqrt_pd, Triton sqrt_rn), but ATen's eager float64 sqrt on CPU is not (0.6% of inputs one ulp off,
    measured against numpy and the compiled kernel): there numpy's (the hardware instruction) is taken."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.from_numpy(np.sqrt(x.numpy()))
    return torch.sqrt(x)


def standard_normals(rows: torch.Tensor, numel: int, keys: torch.Tensor, recip: torch.Tensor,
                     ln_offset: torch.Tensor) -> torch.Tensor:
    """float32 [len(rows), numel]: row j holds the Box-Muller pairs of counters rows[j] | p, p < half =
    ceil(numel / 2), under keys = (k1, k2): r cos in element p, r sin in element half + p (for odd numel the
    last sin is left out). The one definition both paths run: eager as it stands, compiled by torch.compile."""
    half = (numel + 1) // 2
    pair = torch.arange(half, dtype=torch.int64, device=rows.device)
    h = _mix(_mix((rows ^ keys[0])[:, None] ^ pair) ^ keys[1])  # rows and pair share no bits: ^ is |
    minus_log = _minus_log_u1((h >> 32) & MASK32, recip, ln_offset)
    # sqrt(2 L) / 2^31: L in Q44 is exact in float64, scaling by powers of two is exact
    radius = _ieee_sqrt(minus_log.to(torch.float64) * 2.0**-43) * 2.0**-31
    cos, sin = _cos_sin(h & MASK32)  # Q31, exact in float64: one rounding each, the product's, then float32
    both = torch.cat([(radius * cos.to(torch.float64)).to(torch.float32),
                      (radius * sin.to(torch.float64)).to(torch.float32)], dim=1)
    return both[:, :numel]


# ---- which path runs: the same numbers either way, so only cost decides ----

# Ski rental: draws run eagerly until they have cost about what compiling does (the first compiled call,
# dynamo's import included, measured 3.4 s with a warm inductor cache on a 2-core CPU, 7-12 s when loaded or
# cold); from then on every draw runs the compiled kernel, faster at every size (benchmarks/noise_throughput.py).
# On CUDA the eager time counted is the launches' (no sync), so it compiles later than it could.
COMPILE_AFTER_EAGER_SECONDS = 3.0
_eager_seconds = 0.0
_compiled_built = False  # once it is, every draw uses it
_compiled_failed = False


@cache
def _compiled(device: torch.device):
    import torch._dynamo  # only here: a sampling job that draws little never pays its import

    global _compiled_built
    _compiled_built = True

    recip, ln_offset = _tables(device)
    for table in (recip, ln_offset):  # a fixed size keeps them out of the dynamic shapes
        torch._dynamo.mark_static(table)

    def kernel(rows: torch.Tensor, numel: int, keys: torch.Tensor) -> torch.Tensor:
        return standard_normals(rows, numel, keys, recip, ln_offset)

    return torch.compile(kernel, dynamic=True)


def _run_compiled(rows: torch.Tensor, numel: int, keys: torch.Tensor) -> torch.Tensor:
    # a batch of one would be specialised and compiled again: pad it to two rows
    padded = rows.repeat(2) if len(rows) == 1 else rows
    return _compiled(rows.device)(padded, numel, keys)[: len(rows)]


# Eager draws go in chunks of rows: on CPU small enough that the ~160 intermediates stay in cache (2x faster
# than unchunked at 500 x 3072, measured), on CUDA only to bound their memory.
EAGER_CHUNK_PAIRS = {"cpu": 1 << 15}
EAGER_CHUNK_PAIRS_OTHER = 1 << 22


def _run_eager(rows: torch.Tensor, numel: int, keys: torch.Tensor) -> torch.Tensor:
    tables = _tables(rows.device)
    pairs = EAGER_CHUNK_PAIRS.get(rows.device.type, EAGER_CHUNK_PAIRS_OTHER)
    step = max(1, pairs // ((numel + 1) // 2))
    if step >= len(rows):
        return standard_normals(rows, numel, keys, *tables)
    return torch.cat([standard_normals(rows[s:s + step], numel, keys, *tables) for s in range(0, len(rows), step)])


def _run_native(rows: torch.Tensor, numel: int, keys: torch.Tensor) -> torch.Tensor:
    from harness import noise_native

    if not noise_native.available():
        raise RuntimeError("harness.noise_native is not available here (no C compiler, or STEPBENCH_NATIVE_NOISE=0)")
    return noise_native.standard_normals(rows, numel, tuple(keys.tolist()))


def _native_available(device: torch.device) -> bool:
    from harness import noise_native

    return device.type == "cpu" and noise_native.available()


def _run_cheapest(rows: torch.Tensor, numel: int, keys: torch.Tensor) -> torch.Tensor:
    global _eager_seconds, _compiled_failed
    if _native_available(rows.device):  # the C loop: cheapest at every size on a CPU (noise_throughput.py)
        return _run_native(rows, numel, keys)
    if not _compiled_failed and (_compiled_built or _eager_seconds >= COMPILE_AFTER_EAGER_SECONDS):
        try:
            return _run_compiled(rows, numel, keys)
        except Exception as error:  # e.g. no C++ compiler for inductor: the eager path gives the same numbers
            _compiled_failed = True
            warnings.warn(f"harness.noise: the compiled generator failed ({error!r}); drawing eagerly")
    t0 = time.perf_counter()
    out = _run_eager(rows, numel, keys)
    _eager_seconds += time.perf_counter() - t0
    return out


PATHS = {"eager": _run_eager, "compiled": _run_compiled, "native": _run_native}


def draw(keys: torch.Tensor, indices: torch.Tensor, draw_index: int, per_sample: int,
         path: str | None = None) -> torch.Tensor:
    """float32 [len(indices), per_sample]: draw `draw_index` of the samples `indices` (int64) under keys
    (k1, k2) (int64), both on the device. `path` forces one of PATHS (tests, benchmarks); None: the cheapest
    (native C on a CPU where it builds, else eager until compiling pays)."""
    if not 0 <= draw_index < 1 << DRAW_BITS:
        raise ValueError(f"draw index {draw_index} out of range: a sample has at most {1 << DRAW_BITS} draws")
    if per_sample > 2 << PAIR_BITS:
        raise ValueError(f"{per_sample} elements per sample: the noise counter has room for {2 << PAIR_BITS}")
    if len(indices) == 0 or per_sample == 0:
        return torch.empty((len(indices), per_sample), dtype=torch.float32, device=indices.device)
    rows = (indices << (DRAW_BITS + PAIR_BITS)) | (draw_index << PAIR_BITS)
    run = _run_cheapest if path is None else PATHS[path]
    return run(rows, per_sample, keys)


class SampleNoise:
    """Per-sample noise for the samples `indices` of a cell seeded with `seed`; each randn is the next draw."""

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu"):
        self.indices = list(indices)
        self.device = torch.device(device)
        if any(not 0 <= i < 1 << SAMPLE_BITS for i in self.indices):
            raise ValueError(f"sample indices must lie in [0, {1 << SAMPLE_BITS})")
        self._keys = torch.tensor(seed_keys(seed), dtype=torch.int64, device=self.device)
        self._index_tensor = torch.tensor(self.indices, dtype=torch.int64, device=self.device)
        self.draws = 0

    def randn(self, shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
        """[len(indices), *shape] standard normal, the next draw of every sample's stream; float32 numbers
        (then cast to dtype), so every device and compute dtype sees the same ones."""
        out = draw(self._keys, self._index_tensor, self.draws, math.prod(shape))
        self.draws += 1
        return out.reshape(len(self.indices), *shape).to(dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(tuple(x.shape[1:]), dtype=x.dtype)
