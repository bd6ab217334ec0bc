"""Inverting a TarFlow: sequential (with and without KV cache), Jacobi and GS-Jacobi agree with each other
and with the forward map; the pass counters equal hand counts; per-block strategies from CRM/IGM.

Tiny random TarFlows in float64 (T = 16 tokens). Side-by-side checks against the reference code run
outside the repository; their figures are in the docstrings of harness.methods.jacobi_inverse,
jacobi_strategy and harness.models.tarflow.
"""

from __future__ import annotations

import pytest
import torch

from harness.errors import ConfigError
from harness.methods.jacobi_inverse import (BlockStrategy, Guidance, denoise_step, from_reference_lists, gs_jacobi,
                                            jacobi, module_bounds, sequential)
from harness.methods.jacobi_strategy import block_metrics, choose_strategy, strategy_notation, worst_case_passes
from harness.models.tarflow import TarFlow
from harness.noise import SampleNoise

# 3 blocks: identity, flip, identity orders; T = 16 tokens of D = 4 (img 8, patch 2)
TINY = {"in_channels": 1, "img_size": 8, "patch_size": 2, "channels": 16, "num_blocks": 3, "layers_per_block": 2,
        "head_dim": 8, "num_classes": 3, "noise_std": 0.1}
T, K = 16, 3


def random_tarflow(config=TINY, seed=0, out_std=0.02) -> TarFlow:
    """proj_out randomised (it starts at zero, the identity); a larger std makes random flows whose
    inverse overflows."""
    torch.manual_seed(seed)
    model = TarFlow(**config).double()
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=out_std)
    return model.eval()


def noise(n=5, seed=0):
    return SampleNoise(seed, range(n)).randn((1, 8, 8))


LABELS = torch.tensor([0, 1, 2, -1, 1])


def rms(a, b) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def model():
    return random_tarflow()


@pytest.fixture(scope="module")
def exact(model):
    return sequential(model, noise(), LABELS)


def test_forward_map_inverts_the_sequential_inverse(model, exact):
    z, _ = model(exact.x, LABELS)
    assert rms(model.unpatchify(z), noise()) <= 1e-6
    assert (exact.x - noise()).abs().max() > 0.05  # the flow is far from the identity


def test_kv_cache_changes_nothing(model, exact):
    uncached = sequential(model, noise(), LABELS, kv_cache=False)
    assert (uncached.x - exact.x).abs().max() < 1e-12


def test_jacobi_converges_to_the_sequential_inverse(model, exact):
    # a causal iteration is exact after T passes (position t is final after t + 1). That the T-th pass then changes
    # nothing bit for bit (ebound 0 stopping at T) depends on the CPU's attention kernels: on an AVX-512 machine a
    # token's last bits still move with later tokens' values, and ebound 0 ran 19-29 passes; so: T passes, compared
    result = jacobi(model, noise(), LABELS, max_iter=T, ebound=0, clamp=None)
    assert result.cost["block_iterations_max"] == [T] * K
    assert rms(result.x, exact.x) <= 1e-10
    adaptive = jacobi(model, noise(), LABELS, max_iter=100, ebound=1e-12, clamp=None)
    assert max(adaptive.cost["block_iterations_max"]) < T  # this flow contracts: it converges sooner
    assert rms(adaptive.x, exact.x) <= 1e-5


@pytest.mark.parametrize("num_gs, guess", [([2, 4, 8], ["z", "zeros", "z"]), ([0, 1, 16], ["zeros"] * 3),
                                           ([4, 4, 4], ["zeros", "z", "zeros"])])
def test_gs_jacobi_converges_to_the_sequential_inverse(model, exact, num_gs, guess):
    result = gs_jacobi(model, noise(), LABELS, num_gs=num_gs, max_iter=[100] * K, guess=guess, ebound=1e-12,
                       clamp=None)
    assert rms(result.x, exact.x) <= 1e-5


def test_default_clamp_changes_nothing_inside_its_bounds(model):
    z = 0.6 * noise()
    exact = sequential(model, z, LABELS)
    # every block's input and output lies inside [-3, 3], so the clamp must not act
    x = model.patchify(exact.x)
    for block in model.blocks:
        assert x.abs().max() < 3
        x, _ = block(x, LABELS)
    result = gs_jacobi(model, z, LABELS, num_gs=[4, 1, 2], max_iter=[100] * K, guess=["z"] * K, ebound=1e-12)
    assert rms(result.x, exact.x) <= 1e-5


def test_clamp_bounds_the_iterates_as_the_reference_does(model):
    z = 2.5 * noise()  # the exact inverse of the first block inverted leaves [-3, 3]
    assert sequential(model, z, LABELS).x.abs().max() > 3
    clamped = jacobi(model, z, LABELS, max_iter=100, ebound=1e-12, clamp=3.0)
    tokens = model.patchify(clamped.x)
    # the last block inverted (block 0, identity order) clamps tokens 1..T-1; token 0 is z_0 of that block
    assert tokens[:, 1:].abs().max() <= 3.0


def test_the_update_norm_stops_each_sample_on_its_own(model):
    """ebound is the reference's ||x_next - x|| / D per sample: a sample stops where it stops alone."""
    z = noise(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    batch = jacobi(model, z, y, max_iter=100, ebound=1e-3, clamp=None)
    for i in (0, 4):
        alone = jacobi(model, z[i:i + 1], y[i:i + 1], max_iter=100, ebound=1e-3, clamp=None)
        assert (alone.x - batch.x[i:i + 1]).abs().max() < 1e-12
    iterations = [jacobi(model, z[i:i + 1], y[i:i + 1], max_iter=100, ebound=1e-3, clamp=None)
                  .cost["block_iterations_max"] for i in range(6)]
    assert batch.cost["block_iterations_max"] == [max(it[k] for it in iterations) for k in range(K)]
    mean = [sum(it[k] for it in iterations) / 6 for k in range(K)]
    assert batch.cost["block_iterations_mean"] == pytest.approx(mean)
    assert batch.cost["block_iterations_max"][0] < T  # it stopped before exact convergence


def test_gs_jacobi_samples_do_not_depend_on_their_batch(model):
    """Rows that stop early keep their cached keys and values while the others iterate on."""
    z = noise(6)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    kwargs = dict(num_gs=[4, 2, 8], max_iter=[30] * K, guess=["z", "zeros", "z"], ebound=1e-4, clamp=None)
    batch = gs_jacobi(model, z, y, **kwargs)
    alone = [gs_jacobi(model, z[i:i + 1], y[i:i + 1], **kwargs) for i in range(6)]
    assert len({tuple(a.cost["block_iterations_max"]) for a in alone}) > 1  # samples stop at different passes
    for i, a in enumerate(alone):
        assert (a.x - batch.x[i:i + 1]).abs().max() < 1e-12


def test_counted_passes_equal_hand_counts(model):
    z = noise(4)
    y = LABELS[:4].clamp(min=0)
    seq = sequential(model, z, y).cost
    assert seq["passes_per_sample"] == K * (T - 1)
    assert seq["token_evals_per_sample"] == K * (T - 1)  # one new token per pass
    uncached = sequential(model, z, y, kv_cache=False).cost
    assert uncached["passes_per_sample"] == K * (T - 1)
    assert uncached["token_evals_per_sample"] == K * T * (T - 1) / 2  # the prefix 1, 2, ..., T-1 tokens
    # ebound 0 and 3 iterations, fewer than any module needs to converge exactly: a fixed budget
    jac = jacobi(model, z, y, max_iter=3, ebound=0).cost
    assert jac["passes_per_sample"] == K * 3
    assert jac["token_evals_per_sample"] == K * 3 * (T - 1)  # tokens 0..T-2 each pass
    gsj = gs_jacobi(model, z, y, num_gs=[4, 1, 0], max_iter=[3, 3, 3], guess=["z"] * K, ebound=0).cost
    # block 0: 4 modules x 3 passes over 4, 4, 4, 3 tokens; block 1: Jacobi; block 2: sequential
    assert gsj["block_passes_per_sample"] == [12, 3, T - 1]
    assert gsj["block_token_evals_per_sample"] == [3 * 15, 3 * 15, T - 1]
    assert gsj["block_iterations_mean"] == [12, 3, T - 1]
    guided = gs_jacobi(model, z, y, num_gs=[4, 1, 0], max_iter=[3, 3, 3], guess=["z"] * K, ebound=0,
                       guidance=Guidance(scale=1.0)).cost
    assert guided["passes_per_sample"] == gsj["passes_per_sample"]  # the guided pair is one pass...
    assert guided["network_rows_per_sample"] == 2 * gsj["network_rows_per_sample"]  # ...of twice the rows
    assert guided["token_evals_per_sample"] == 2 * gsj["token_evals_per_sample"]


def test_denoise_step_is_counted_as_one_full_pass_per_block(model, exact):
    step = denoise_step(model, exact.x, LABELS)
    assert torch.equal(step.x, model.score_denoise(exact.x, LABELS))
    assert step.cost["block_passes_per_sample"] == [1] * K
    assert step.cost["token_evals_per_sample"] == K * T


def test_solver_iterations_and_counted_passes_agree_when_adaptive(model):
    result = gs_jacobi(model, noise(6), None, num_gs=[2, 1, 4], max_iter=[50] * K, guess=["z", "zeros", "z"],
                       ebound=1e-4)
    assert result.cost["block_passes_per_sample"] == pytest.approx(result.cost["block_iterations_mean"])
    assert result.cost["passes_per_sample"] < K * (T - 1) * 2


@pytest.mark.parametrize("guidance", [Guidance(scale=1.5), Guidance(scale=2.0, what="a", annealed=True),
                                      Guidance(scale=0.7, what="b", attn_temp=0.6)])
def test_guided_inverses_agree(model, guidance):
    z, y = noise(4), torch.tensor([0, 1, 2, 1])
    exact = sequential(model, z, y, guidance=guidance)
    assert (exact.x - sequential(model, z, y).x).abs().max() > 1e-3  # guidance did something
    assert (sequential(model, z, y, guidance=guidance, kv_cache=False).x - exact.x).abs().max() < 1e-12
    gsj = gs_jacobi(model, z, y, num_gs=[2, 4, 1], max_iter=[100] * K, guess=["z"] * K, ebound=1e-12, clamp=None,
                    guidance=guidance)
    assert rms(gsj.x, exact.x) <= 1e-5


def apples_annealed_reverse(model, z, y, scale):
    """apple/ml-tarflow's MetaBlock.reverse loop, written out with guidance on a and b annealed by
    (i + 1) / (T - 1): the conditional pass with y, the unconditional one with the mean embedding, over
    the whole prefix each step (no cache)."""
    x = model.prior_tokens(z)
    for block in reversed(model.blocks):
        x = block.permute(x).clone()
        for i in range(T - 1):
            a, b = (t[:, -1] for t in block.transform(x[:, :i + 1], y))
            a_u, b_u = (t[:, -1] for t in block.transform(x[:, :i + 1], None))
            g = (i + 1) / (T - 1) * scale
            x[:, i + 1] = x[:, i + 1] * torch.exp(a + g * (a - a_u)) + b + g * (b - b_u)
        x = block.permute(x)
    return model.unpatchify(x)


def test_annealed_guidance_is_apples(model):
    z, y = noise(3), torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = apples_annealed_reverse(model, z, y, 2.0)
    guided = Guidance(scale=2.0, annealed=True)
    assert (sequential(model, z, y, guidance=guided).x - expected).abs().max() < 1e-12
    gsj = gs_jacobi(model, z, y, num_gs=[2, 1, 4], max_iter=[100] * K, guess=["z"] * K, ebound=1e-12, clamp=None,
                    guidance=guided)
    assert rms(gsj.x, expected) <= 1e-5


def test_guidance_limits(model):
    """Scale 0 is no guidance; guided samples follow their label. (apple's mixing formula itself is
    checked side by side against its reverse().)"""
    z, y = noise(4), torch.tensor([0, 1, 2, 1])
    assert torch.equal(sequential(model, z, y, guidance=Guidance(scale=0.0)).x, sequential(model, z, y).x)
    a = sequential(model, z, torch.tensor([0, 0, 0, 0]), guidance=Guidance(scale=1.0)).x
    b = sequential(model, z, torch.tensor([1, 1, 1, 1]), guidance=Guidance(scale=1.0)).x
    assert (a - b).abs().max() > 1e-3


def test_bad_strategies_are_one_line_errors(model):
    z = noise(2)
    with pytest.raises(ConfigError, match="num_gs 3 must be 0 .* divide the 16 tokens; valid: 0, 1, 2, 4, 8, 16"):
        gs_jacobi(model, z, None, num_gs=[3, 1, 1], max_iter=[5] * K, guess=["z"] * K)
    with pytest.raises(ConfigError, match="guess 'one' unknown; valid: z, zeros"):
        gs_jacobi(model, z, None, num_gs=[1] * K, max_iter=[5] * K, guess=["one"] * K)
    with pytest.raises(ConfigError, match="one entry per block"):
        gs_jacobi(model, z, None, num_gs=[1, 1], max_iter=[5] * K, guess=["z"] * K)
    with pytest.raises(ConfigError, match="max_iter must be an integer >= 1"):
        jacobi(model, z, None, max_iter=0)
    unconditional = random_tarflow({**TINY, "num_classes": 0})
    with pytest.raises(ConfigError, match="guidance needs a class-conditional TarFlow"):
        sequential(unconditional, z, None, guidance=Guidance(scale=1.0))


def test_module_bounds_follow_the_reference_split():
    # T = 16 in 4 modules: reads [0,4) [4,8) [8,12) [12,15), solves tokens 1-4, 5-8, 9-12, 13-15
    assert module_bounds(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 15)]
    assert module_bounds(16, 1) == [(0, 15)]
    assert module_bounds(16, 0) == module_bounds(16, 16) == [(i, i + 1) for i in range(15)]


def test_reference_lists_are_in_sampling_order():
    # the reference's README, Img64cond [0/7-256/8-1/13-6]: lists run from the last block to the first
    strategies = from_reference_lists([8, 1, 1, 1, 1, 1, 1, 0], [13, 6, 6, 6, 6, 6, 6, 1], [1, 0, 0, 0, 0, 1, 1, 1])
    assert strategies[0] == BlockStrategy(0, 1, "zeros")
    assert strategies[7] == BlockStrategy(8, 13, "zeros")
    assert strategies[1] == BlockStrategy(1, 6, "zeros") and strategies[6] == BlockStrategy(1, 6, "z")


# ---- CRM, IGM and the strategy ---------------------------------------------------------------------

# The reference README's published strategies, lists in sampling order, and their notation
PUBLISHED = [
    ("[6-8-32-10]", [1, 8, 1, 1, 1, 1, 1, 1], [10, 32, 10, 10, 10, 10, 10, 10], 1024),  # Img128cond
    ("[7-8-32-10]", [8, 1, 1, 1, 1, 1, 1, 1], [32, 10, 10, 10, 10, 10, 10, 10], 1024),  # AFHQ
    ("[0/6-8-32-20]", [1, 8, 1, 1, 1, 1, 1, 8], [20, 32, 20, 20, 20, 20, 20, 32], 1024),  # Img64uncond
    ("[0/7-256/8-1/13-6]", [8, 1, 1, 1, 1, 1, 1, 0], [13, 6, 6, 6, 6, 6, 6, 1], 256),  # Img64cond, patch 4
]


@pytest.mark.parametrize("notation, num_GS_list, max_jacobi_list, tokens", PUBLISHED)
def test_notation_of_the_published_strategies(notation, num_GS_list, max_jacobi_list, tokens):
    blocks = from_reference_lists(num_GS_list, max_jacobi_list, [0] * 8)
    assert strategy_notation([s.num_gs for s in blocks], [s.max_iter for s in blocks], tokens) == notation


# The reference README's CRM table (percent per block 0-7) and the blocks its strategies segment
PUBLISHED_CRM = {
    "Img128cond": ([5.22, 5.63, 2.47, 10.93, 7.74, 7.35, 56.57, 4.05], [6]),
    "AFHQ": ([6.33, 6.28, 8.16, 7.94, 9.01, 10.27, 9.36, 42.60], [7]),
    "Img64uncond": ([50.71, 2.42, 2.29, 3.38, 1.77, 1.33, 33.62, 4.44], [0, 6]),
    "Img64cond": ([74.58, 4.88, 0.72, 0.96, 4.05, 2.68, 1.62, 10.46], [0]),  # the authors also segment 7
}


@pytest.mark.parametrize("factor", [None, 0.9, 2.6])  # None: the default; 0.9 and 2.6 near the ends of the range
@pytest.mark.parametrize("name", PUBLISHED_CRM)
def test_tough_blocks_of_the_published_crm_tables(name, factor):
    shares, tough = PUBLISHED_CRM[name]
    metrics = [{"block": k, "crm_share": s / 100, "igm": {"z": 1.0, "zeros": 2.0}} for k, s in enumerate(shares)]
    strategy = choose_strategy(metrics, 1024, **({} if factor is None else {"tough_factor": factor}))
    assert strategy["tough_blocks"] == tough
    assert strategy["num_gs"] == [8 if k in tough else 1 for k in range(8)]
    assert strategy["max_iter"] == [32 if k in tough else 10 for k in range(8)]


def test_choose_strategy_takes_the_smaller_igm_and_counts_the_worst_case():
    metrics = [{"block": 0, "crm_share": 0.7, "igm": {"z": 3.0, "zeros": 1.0}},
               {"block": 1, "crm_share": 0.1, "igm": {"z": 0.5, "zeros": 1.0}},
               {"block": 2, "crm_share": 0.1, "igm": {"z": 0.5, "zeros": 0.4}},
               {"block": 3, "crm_share": 0.1, "igm": {"z": 0.1, "zeros": 0.2}}]
    strategy = choose_strategy(metrics, 64, gs_modules=4, tough_max_iter=16, else_max_iter=6)
    assert strategy["guess"] == ["zeros", "z", "zeros", "z"]
    assert strategy["notation"] == "[0-4-16-6]"
    assert strategy["worst_case_passes"] == 4 * 16 + 3 * 6
    sequential_tough = choose_strategy(metrics, 64, gs_modules=0)
    assert sequential_tough["notation"] == "[0-64-1-10]"
    assert sequential_tough["worst_case_passes"] == 63 + 3 * 10
    assert worst_case_passes([0, 1, 8, 64], [5, 5, 5, 5], 64) == 63 + 5 + 40 + 63


def test_igm_is_one_jacobi_update_from_each_guess():
    """IGM of a one-block flow from its own inverse: ||mean(x1 - x)|| with x1 the first Jacobi iterate
    from guess z (resp. zeros), computed here through the solver, there through the forward pass."""
    model = random_tarflow({**TINY, "num_blocks": 1}, out_std=0.3)
    images = torch.rand(64, 1, 8, 8, dtype=torch.float64) * 2 - 1
    labels = torch.arange(64) % 3
    # as the reference: the forward pass with the labels, the update with the mean class embedding
    metrics = block_metrics(model, images, labels, batch_size=24)
    z = model.unpatchify(model(images, labels)[0])
    for guess in ("z", "zeros"):
        x1 = jacobi(model, z, None, max_iter=1, ebound=0, guess=guess, clamp=None).x
        residual = (model.patchify(x1) - model.patchify(images)).mean(dim=0)
        assert metrics[0]["igm"][guess] == pytest.approx(torch.linalg.matrix_norm(residual, ord=2).item(), rel=1e-12)
    assert metrics[0]["igm"]["z"] != pytest.approx(metrics[0]["igm"]["zeros"], rel=1e-3)


def test_block_metrics_are_json_and_do_not_depend_on_the_batching():
    import json

    model = random_tarflow()
    images = torch.rand(50, 1, 8, 8, dtype=torch.float64) * 2 - 1
    whole, chunked = block_metrics(model, images), block_metrics(model, images, batch_size=7)
    json.dumps(whole)
    for a, b in zip(whole, chunked):
        assert a["crm"] == pytest.approx(b["crm"], rel=1e-12)
        assert a["igm"]["zeros"] == pytest.approx(b["igm"]["zeros"], rel=1e-12)
    assert sum(m["crm_share"] for m in whole) == pytest.approx(1.0)
