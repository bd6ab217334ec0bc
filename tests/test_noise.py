"""harness.noise: the counter-based per-sample generator.

Byte identity (batch sizes, index sets, eager against compiled, CPU against CUDA), the stream of draws, the
definition against an independent float64 Box-Muller of the same hash, and statistics that a broken
generator fails (moments, KS against N(0, 1), correlations between neighbouring samples, draws, elements
and Box-Muller partners, distinct streams).
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from harness import noise
from harness.noise import SampleNoise

from conftest import REPO

# odd and even per-sample sizes: for odd ones the last sin of the last pair is left out
SHAPES = [(1, 8, 8), (3, 5), (2,), (1,)]


def bits(x: torch.Tensor) -> bytes:
    return x.to(torch.float32).cpu().numpy().tobytes()


def batched(seed, num, batch, shape, draws=2, device="cpu"):
    """`draws` successive draws of samples 0..num-1, drawn in batches of `batch`, rows put back together."""
    out = [[] for _ in range(draws)]
    for start in range(0, num, batch):
        gen = SampleNoise(seed, range(start, min(start + batch, num)), device=device)
        for d in range(draws):
            out[d].append(gen.randn(shape, dtype=torch.float32))
    return [torch.cat(parts) for parts in out]


@pytest.mark.parametrize("shape", SHAPES)
def test_byte_identical_across_batch_sizes(shape):
    whole = batched(5, 64, 64, shape)
    for batch in (1, 7):
        for a, b in zip(whole, batched(5, 64, batch, shape)):
            assert bits(a) == bits(b)


@pytest.mark.parametrize("shape", SHAPES)
def test_any_index_set_gets_its_rows_of_the_cell(shape):
    whole = SampleNoise(2, range(64)).randn(shape, dtype=torch.float32)
    assert bits(SampleNoise(2, range(3, 10)).randn(shape, dtype=torch.float32)) == bits(whole[3:10])
    picked = [40, 3, 63, 9]
    assert bits(SampleNoise(2, picked).randn(shape, dtype=torch.float32)) == bits(whole[picked])
    for offset in range(1, 8):  # the samples land at every position of a vector of 8 or 16
        assert bits(SampleNoise(2, range(offset, 64)).randn(shape, dtype=torch.float32)) == bits(whole[offset:])


def test_thread_count_does_not_matter():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = SampleNoise(0, range(300)).randn((3, 32, 32), dtype=torch.float32)
        torch.set_num_threads(2)
        two = SampleNoise(0, range(300)).randn((3, 32, 32), dtype=torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert bits(one) == bits(two)


def test_draws_continue_the_stream_whatever_their_shapes():
    gen = SampleNoise(4, range(10))
    first, second, third = gen.randn((2,)), gen.randn((3, 4)), gen.randn((2,))
    keys, index = torch.tensor(noise.seed_keys(4)), torch.arange(10)
    for d, drawn in enumerate((first, second, third)):
        expected = noise.draw(keys, index, d, math.prod(drawn.shape[1:]))
        assert bits(drawn.reshape(10, -1)) == bits(expected)
    assert bits(first) != bits(third)
    like = SampleNoise(4, range(10))
    like.randn((2,))
    assert bits(like.randn_like(torch.zeros(10, 3, 4))) == bits(second)


def test_dtype_is_a_cast_of_the_float32_numbers():
    as64 = SampleNoise(1, range(20)).randn((3, 3), dtype=torch.float64)
    as32 = SampleNoise(1, range(20)).randn((3, 3), dtype=torch.float32)
    assert as64.dtype == torch.float64 and torch.equal(as64, as32.double())


def test_matches_float64_box_muller_of_the_documented_hash():
    """The definition in the module docstring, recomputed with numpy's float64 log, cos and sin."""
    seed, indices, draw_index, n = 9, np.arange(50, 150), 3, 2 * 2000 - 1
    half = (n + 1) // 2
    k1, k2 = (np.uint64(k & noise.MASK64) for k in noise.seed_keys(seed))

    def mix(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    counter = (indices.astype(np.uint64)[:, None] << np.uint64(40)) | np.uint64(draw_index << 24) \
        | np.arange(half, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = mix(mix(counter ^ k1) ^ k2)
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 1) / 2.0**32
    u2 = (h & np.uint64(noise.MASK32)).astype(np.float64) / 2.0**32
    r = np.sqrt(-2 * np.log(u1))
    exact = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=1)[:, :n]

    got = noise.draw(torch.tensor(noise.seed_keys(seed)), torch.from_numpy(indices), draw_index, n).numpy()
    half_ulp = np.spacing(np.abs(got)) / 2  # the rounding to float32
    assert np.all(np.abs(got - exact) <= half_ulp + 2.0**-26)
    assert np.abs(got - exact).max() > 0  # float32 numbers, not float64 ones


def test_refuses_counters_it_has_no_room_for():
    with pytest.raises(ValueError, match="sample indices"):
        SampleNoise(0, [1 << noise.SAMPLE_BITS])
    with pytest.raises(ValueError, match="elements per sample"):
        SampleNoise(0, range(1)).randn(((2 << noise.PAIR_BITS) + 1,))
    with pytest.raises(ValueError, match="draw index"):
        noise.draw(torch.tensor(noise.seed_keys(0)), torch.arange(2), 1 << noise.DRAW_BITS, 4)
    assert SampleNoise(0, []).randn((3,)).shape == (0, 3)


# ---- statistics (1e6 draws; thresholds about 5 standard errors: a correct generator fails with p ~ 1e-6) ----


@pytest.fixture(scope="module")
def million():
    """Samples 0..999 x 2 draws x 500 elements of seed 0: float64 [1000, 2, 500]."""
    gen = SampleNoise(0, range(1000))
    return torch.stack([gen.randn((500,)) for _ in range(2)], dim=1).numpy()


def test_moments(million):
    z = million.ravel()
    se = 1 / math.sqrt(z.size)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**3).mean()) < 5 * math.sqrt(15) * se
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96) * se
    assert abs((z > 0).mean() - 0.5) < 5 * 0.5 * se
    assert np.abs(z).max() <= 6.67  # u1 >= 2^-32


def test_ks_against_the_normal(million):
    z = million.ravel()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # the test has the power to see a 2% scale error or a shift of 0.005
    assert stats.kstest(1.02 * z, "norm").pvalue < 1e-3
    assert stats.kstest(z + 0.005, "norm").pvalue < 1e-3


def _uncorrelated(a, b):
    a, b = a.ravel(), b.ravel()
    threshold = 5 / math.sqrt(a.size)
    assert abs(np.corrcoef(a, b)[0, 1]) < threshold
    assert abs(np.corrcoef(a**2, b**2)[0, 1]) < threshold  # magnitudes too (a shared radius would show)


def test_no_correlation_between_neighbours(million):
    _uncorrelated(million[:-1], million[1:])  # neighbouring samples
    _uncorrelated(million[:, 0], million[:, 1])  # successive draws
    _uncorrelated(million[..., :-1], million[..., 1:])  # neighbouring elements
    _uncorrelated(million[..., :250], million[..., 250:])  # Box-Muller partners (r cos, r sin)


def test_distinct_seeds_samples_and_draws_give_distinct_streams():
    shape = (4000,)
    base = SampleNoise(0, [5])
    streams = {"seed 0, sample 5, draw 0": base.randn(shape), "draw 1": base.randn(shape),
               "seed 1": SampleNoise(1, [5]).randn(shape), "sample 6": SampleNoise(0, [6]).randn(shape),
               "sample 5 << 1": SampleNoise(0, [10]).randn(shape), "seed 2^32": SampleNoise(1 << 32, [5]).randn(shape)}
    names = list(streams)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = streams[a].ravel().numpy(), streams[b].ravel().numpy()
            assert (x == y).mean() < 1e-3, (a, b)
            assert abs(np.corrcoef(x, y)[0, 1]) < 5 / math.sqrt(x.size), (a, b)


# ---- paths: eager and compiled, and which one runs ----


def test_eager_and_compiled_are_byte_identical_on_a_large_draw():
    keys, index = torch.tensor(noise.seed_keys(7)), torch.arange(100, 751)  # 651 x 3071: 2M, odd both ways
    eager = noise.draw(keys, index, 2, 3071, path="eager")
    compiled = noise.draw(keys, index, 2, 3071, path="compiled")
    assert bits(eager) == bits(compiled)
    for rows in (slice(0, 1), slice(3, 10), slice(5, 69)):  # batches of 1, 7, 64 on the compiled path
        assert bits(noise.draw(keys, index[rows], 2, 3071, path="compiled")) == bits(eager[rows])


def test_native_and_eager_are_byte_identical(monkeypatch):
    from harness import noise_native

    if not noise_native.available():
        pytest.skip("harness.noise_native did not build here (no C compiler?): the default path draws through torch")
    keys, index = torch.tensor(noise.seed_keys(7)), torch.arange(100, 751)  # 651 x 3071: 2M, odd both ways
    eager = noise.draw(keys, index, 2, 3071, path="eager")
    monkeypatch.setattr(noise_native, "PAIRS_PER_THREAD", 1 << 12)  # split across threads, unevenly
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        native = noise.draw(keys, index, 2, 3071, path="native")
    finally:
        torch.set_num_threads(threads)
    assert bits(native) == bits(eager)
    for rows in (slice(0, 1), slice(3, 10), slice(5, 69)):  # batches of 1, 7, 64
        assert bits(noise.draw(keys, index[rows], 2, 3071, path="native")) == bits(eager[rows])
    for numel in (1, 2, 63, 64):  # the last sin left out for odd sizes
        assert bits(noise.draw(keys, index[:9], 5, numel, path="native")) == bits(
            noise.draw(keys, index[:9], 5, numel, path="eager"))
    # what a sampling job gets by default on a CPU
    assert bits(SampleNoise(7, range(100, 110)).randn((3071,), dtype=torch.float32)) == bits(
        noise.draw(keys, index[:10], 0, 3071, path="eager"))


def test_without_a_c_compiler_the_default_path_draws_through_torch(monkeypatch):
    from harness import noise_native

    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("STEPBENCH_NATIVE_CACHE", "/nonexistent-dir-for-the-test")
    noise_native._library.cache_clear()
    try:
        assert not noise_native.available()
        got = SampleNoise(3, range(5)).randn((6,))
    finally:
        noise_native._library.cache_clear()
    assert bits(got) == bits(noise.draw(torch.tensor(noise.seed_keys(3)), torch.arange(5), 0, 6, path="eager"))


def test_draws_switch_to_compiled_once_eager_has_cost_as_much(monkeypatch):
    monkeypatch.setattr(noise, "_native_available", lambda device: False)  # the torch paths' choice
    calls = []
    monkeypatch.setattr(noise, "_run_compiled", lambda *args: calls.append("compiled") or noise._run_eager(*args))
    monkeypatch.setattr(noise, "_compiled_failed", False)
    monkeypatch.setattr(noise, "_compiled_built", False)
    monkeypatch.setattr(noise, "_eager_seconds", 0.0)
    monkeypatch.setattr(noise, "COMPILE_AFTER_EAGER_SECONDS", 3600.0)
    SampleNoise(0, range(10)).randn((4,))
    assert calls == [] and noise._eager_seconds > 0
    monkeypatch.setattr(noise, "COMPILE_AFTER_EAGER_SECONDS", noise._eager_seconds)
    SampleNoise(0, range(10)).randn((4,))
    assert calls == ["compiled"]


def test_a_failing_compile_falls_back_to_the_same_numbers(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(noise, "_run_compiled", broken)
    monkeypatch.setattr(noise, "_native_available", lambda device: False)
    monkeypatch.setattr(noise, "_compiled_failed", False)
    monkeypatch.setattr(noise, "_compiled_built", False)
    monkeypatch.setattr(noise, "COMPILE_AFTER_EAGER_SECONDS", 0.0)
    with pytest.warns(UserWarning, match="no C.. compiler"):
        got = SampleNoise(3, range(5)).randn((6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        SampleNoise(3, range(5)).randn((6,))
    assert bits(got) == bits(noise.draw(torch.tensor(noise.seed_keys(3)), torch.arange(5), 0, 6, path="eager"))


def test_drawing_a_small_model_s_noise_does_not_import_dynamo():
    code = ("import sys; from harness.noise import SampleNoise; g = SampleNoise(0, range(500)); "
            "[g.randn((1, 8, 8)) for _ in range(20)]; print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_equals_cpu(compiled):
    keys, index = noise.seed_keys(11), torch.arange(300, 813)  # 513 x 3 x 33 x 33
    cpu = noise.draw(torch.tensor(keys), index, 4, 3267, path="eager")
    cuda = noise.draw(torch.tensor(keys, device="cuda"), index.cuda(), 4, 3267, path="compiled" if compiled else "eager")
    assert bits(cpu) == bits(cuda)
    for shape in SHAPES:
        for a, b in zip(batched(5, 64, 7, shape), batched(5, 64, 64, shape, device="cuda")):
            assert bits(a) == bits(b)


def test_cells_and_references_from_other_noise_are_not_reused(monkeypatch):
    """The noise's definition is part of the cache keys: a cell's Snakemake param, a reference solution's file."""
    from harness import cells, references

    def keys():
        return (cells.cell_config_hash({"adapter": "gmm2d"}, {"solver": "euler"}, 8, 0, 10),
                references.reference_key("gmm2d", {"adapter": "gmm2d"}, "exact", 0, 10, {}))

    now = keys()
    monkeypatch.setattr(cells, "NOISE_VERSION", "another definition")
    monkeypatch.setattr(references, "NOISE_VERSION", "another definition")
    assert all(a != b for a, b in zip(now, keys()))
