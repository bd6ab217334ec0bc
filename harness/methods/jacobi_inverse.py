"""Inverting a TarFlow: the exact sequential loop, Jacobi and Gauss-Seidel-Jacobi iteration (Liu & Qin
2025, "Accelerate TarFlow Sampling with GS-Jacobi Iteration"; reference code
Minokori/GS-Jacobi_for_TarFlow, GS_Jacobi_sampling.py, MetaBlock.reverse).

A block maps x -> z with z_i = (x_i - b_i(x_<i)) exp(-a_i(x_<i)); its inverse is the fixed point of

    x_i = exp(a_i(x_<i)) z_i + b_i(x_<i),   x_0 = z_0.

- `sequential`: token by token, T - 1 single-token passes per block with a KV cache (apple/ml-tarflow's
  `MetaBlock.reverse`); exact. `kv_cache=False` recomputes the prefix every step (T(T-1)/2 token
  evaluations per block), the baseline without a cache.
- `jacobi`: every iteration is one causal pass over tokens 0..T-2, updating all of 1..T-1 at once;
  after k iterations the first k + 1 tokens are exact, so T - 1 iterations reach the sequential result.
- `gs_jacobi`: per-block strategies. `num_gs` modules of T / num_gs tokens run one after another
  (Gauss-Seidel); the tokens of a module iterate in parallel (Jacobi), attending to the converged
  earlier modules through the KV cache. num_gs 0 (or T) is the sequential loop, 1 is pure Jacobi.
  Each block (each module) has its own maximum iteration count and initial guess: "z" (z itself,
  the reference's guess 0) or "zeros" (z_0 then zeros, its guess 1).

As the reference: iterates are clamped to [-clamp, clamp] (3 there); a module stops at `max_iter`
iterations or when ||x_next - x|| / D <= ebound (D the token size; 1e-6 there), the update norm over
the module's tokens, and the keys and values it leaves in the cache are those of its last iteration's
inputs. Differences, all deliberate:
- the stopping test is per sample. The reference divides one norm over the whole batch by B D, so a
  sample's iterations would depend on its batch; per sample it is the reference's test at B = 1. Rows
  that have stopped are not evaluated again, so the counted passes are each sample's own.
- token 0 is z_0, never clamped: the reference's pure-Jacobi mode clamps it as a side effect (its
  GS-Jacobi mode does not), so it differs from ours only where |z_0| > clamp.
- a Jacobi pass reads tokens 0..T-2 (the reference also passes token T-1, whose output is dropped).
- num_gs must divide T: the reference silently leaves tokens unsolved otherwise.
- the reference's `incre1` path (hard-wired to the 8th block in sampling order, indexing token 0
  where it means token j) is not reproduced.
Guidance is apple's: the conditional and unconditional passes give (a, b) and (a_u, b_u), and
a += g (a - a_u), b += g (b - b_u), with g scaled by (i + 1) / (T - 1) for the output of token i when
annealed; attn_temp divides the unconditional pass's attention logits. The two run as one batch of 2B
rows: one pass, twice the network rows.

Cost is counted, not computed: harness.nfe.PassCounter hooks every block's network call and the
result's `cost` reports sequential passes per sample (the family's budget axis), network rows and
token evaluations, per block too, beside each block's iteration counts as the solver saw them (mean
and max over samples).

Lists per block (num_gs, max_iter, guess) are in `model.blocks` order, block 0 first (the order of
CRM and of the paper's [Stack-GS-J-Else] notation). The reference's lists run in sampling order, last
block first: `from_reference_lists` converts.

Checked side by side with the reference code, run outside the repository (apple/ml-tarflow 313120e,
transformer_flow.py; Minokori/GS-Jacobi_for_TarFlow 4593d3f, GS_Jacobi_sampling.py), on one random
conditional TarFlow (img 8, patch 2: T = 16 tokens of D = 4; 4 blocks x 2 layers, 64 channels, 3
classes, proj_out ~ N(0, 0.02^2)) loaded with the same state dict into all three; 8 samples of z,
scaled by 0.8 so that no iterate reaches the clamp, each run alone through the GS-Jacobi reference
(its stopping test is over the batch). Max abs differences:
- float64 (the references' .float() casts removed: with them their layer norms fail in float64 and
  their exp rounds to float32): apple's reverse vs `sequential` 2.7e-15, guided (g 1.5; g 2 annealed
  with attn_temp 0.7; a only) 3.6e-15; GS-Jacobi reference vs ours: Jacobi (ebound 1e-6; guess zeros
  with ebound 1e-4; a fixed 5 iterations) 1.3e-15, GS-Jacobi in [4, 2, 1, 8] modules (sampling order),
  and with a sequential block, 1.6e-15, guided 2.2e-15, guided and annealed 1.8e-9 (the reference
  computes the annealing factors of its parallel modes in float32, torch.arange(..) / (T - 1)).
  Per-block passes (the reference's reverse_substep calls) equal ours in 8/8 samples in all nine
  settings.
- float32, the reference files unmodified: the sequential inverse bit-identical (0.0), guided 2.4e-6
  (our guided pair is one batch), Jacobi and GS-Jacobi 6e-7 to 1.4e-6; passes equal in 8/8 samples,
  7/8 in the two annealed guided settings (one block's update norm on the other side of ebound).
- iterates beyond the clamp (z x 1.6): the 6 samples where no block's z_0 leaves [-3, 3] agree to
  1.3e-15, the 2 where one does differ by up to 0.15: the reference's Jacobi mode clamps token 0.
And on the trained digits-tarflow (harness.training.tarflow's recipe: T = 64 tokens of D = 1, 4 blocks
x 2 layers, 10 classes), 8 samples of unscaled z: in float64 every setting above agrees to <= 3.1e-14
(annealed guided Jacobi modes 9.5e-8, as above) with passes equal in 8/8 samples in all of them; in
float32 (files unmodified) the unguided sequential inverse is bit-identical, everything else agrees
to <= 1.4e-5, and pass counts match in 8/8 samples for fixed budgets and ebound 1e-4 but often differ
by one or two at ebound 1e-6 (5/8 for Jacobi, 0-1/8 guided): with D = 1 an update norm of 1e-6 over
a module is at float32 rounding, so either implementation's rounding decides.
Note for choosing ebound: the reference's test divides one norm over its batch by B D, so at batch B
it stops each sample roughly where ours would at ebound * sqrt(B).
The forward map, the log-determinant and the denoising step: harness.models.tarflow's docstring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from harness.errors import ConfigError, StepbenchError
from harness.models.tarflow import KVCache, MetaBlock, TarFlow
from harness.nfe import PassCounter

GUESSES = ("z", "zeros")  # the reference's guess_list values 0 and 1
DEFAULT_EBOUND = 1e-6  # GS_Jacobi_sampling.Model.reverse
DEFAULT_CLAMP = 3.0  # torch.clamp(x_next, min=-3, max=3) there


@dataclass(frozen=True)
class BlockStrategy:
    """How one block is inverted: num_gs 0 (or T) sequential, 1 Jacobi, > 1 GS-Jacobi modules;
    max_iter per module (ignored by the sequential loop); the initial guess, "z" or "zeros"."""

    num_gs: int = 1
    max_iter: int = 1
    guess: str = "z"


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance on a and b, as apple/ml-tarflow's reverse; scale 0 is none."""

    scale: float = 0.0
    what: str = "ab"  # which of a (log-scale) and b (shift) are guided
    annealed: bool = False  # scale g by (i + 1) / (T - 1) for token i's output
    attn_temp: float = 1.0  # attention temperature of the unconditional pass


@dataclass
class Inversion:
    x: torch.Tensor  # [B, C, H, W] the inverse of z (before any denoising step)
    cost: dict  # JSON-able: counted passes and token evaluations, per-block iterations


def sequential(model: TarFlow, z: torch.Tensor, y: torch.Tensor | None = None, *,
               guidance: Guidance | None = None, kv_cache: bool = True) -> Inversion:
    """The exact inverse: T - 1 single-token passes per block."""
    return invert(model, z, y, [BlockStrategy(num_gs=0)] * len(model.blocks), guidance=guidance, kv_cache=kv_cache)


def jacobi(model: TarFlow, z: torch.Tensor, y: torch.Tensor | None = None, *, max_iter: int,
           ebound: float = DEFAULT_EBOUND, guess: str = "z", clamp: float | None = DEFAULT_CLAMP,
           guidance: Guidance | None = None) -> Inversion:
    """Every block by Jacobi iteration, at most max_iter passes each (ebound 0: exactly max_iter)."""
    strategy = BlockStrategy(num_gs=1, max_iter=max_iter, guess=guess)
    return invert(model, z, y, [strategy] * len(model.blocks), guidance=guidance, ebound=ebound, clamp=clamp)


def gs_jacobi(model: TarFlow, z: torch.Tensor, y: torch.Tensor | None = None, *,
              num_gs: Sequence[int], max_iter: Sequence[int], guess: Sequence[str],
              ebound: float = DEFAULT_EBOUND, clamp: float | None = DEFAULT_CLAMP,
              guidance: Guidance | None = None) -> Inversion:
    """Per-block strategies, lists in model.blocks order (e.g. from jacobi_strategy.choose_strategy)."""
    lengths = {len(num_gs), len(max_iter), len(guess)}
    if lengths != {len(model.blocks)}:
        raise ConfigError(f"gs_jacobi: num_gs, max_iter and guess need one entry per block ({len(model.blocks)}); "
                          f"got {len(num_gs)}, {len(max_iter)}, {len(guess)}")
    strategies = [BlockStrategy(n, m, g) for n, m, g in zip(num_gs, max_iter, guess)]
    return invert(model, z, y, strategies, guidance=guidance, ebound=ebound, clamp=clamp)


def from_reference_lists(num_GS_list, max_jacobi_list, guess_list) -> list[BlockStrategy]:
    """The reference's per-block lists (sampling order, last block first; guess 0 = z, 1 = zeros) as
    strategies in model.blocks order."""
    return [BlockStrategy(int(n), int(m), GUESSES[int(g)])
            for n, m, g in reversed(list(zip(num_GS_list, max_jacobi_list, guess_list)))]


def invert(model: TarFlow, z: torch.Tensor, y: torch.Tensor | None, strategies: Sequence[BlockStrategy], *,
           guidance: Guidance | None = None, ebound: float = DEFAULT_EBOUND,
           clamp: float | None = DEFAULT_CLAMP, kv_cache: bool = True) -> Inversion:
    """Invert the blocks last to first, block k by strategies[k]. z: [B, C, H, W] standard normal
    (harness.noise.SampleNoise), so sample i depends only on its own z."""
    T = model.num_tokens
    _check(model, z, y, strategies, guidance, ebound, clamp, kv_cache)
    guide = guidance if guidance is not None and guidance.scale != 0 else None
    x = model.prior_tokens(z)
    num_samples = x.shape[0]
    iterations: list[torch.Tensor | None] = [None] * len(model.blocks)
    with torch.no_grad(), PassCounter(model.blocks, num_samples, 2 if guide else 1) as counter:
        for k in reversed(range(len(model.blocks))):
            x, iterations[k] = _invert_block(model.blocks[k], x, y, strategies[k], T, guide, ebound, clamp,
                                             kv_cache)
    cost = counter.summary()
    cost["block_iterations_mean"] = [it.double().mean().item() for it in iterations]
    cost["block_iterations_max"] = [int(it.max()) for it in iterations]
    cost["strategy"] = [asdict(s) for s in strategies]
    return Inversion(model.unpatchify(x), cost)


def denoise_step(model: TarFlow, x: torch.Tensor, y: torch.Tensor | None = None, step_scale: float = 1.0) -> Inversion:
    """TarFlow's last sampling step (TarFlow.score_denoise) with its cost counted as the inverses' are:
    one forward pass of every block over all T tokens (and its backward, not counted as a pass)."""
    with PassCounter(model.blocks, x.shape[0]) as counter:
        x = model.score_denoise(x, y, step_scale)
    return Inversion(x, counter.summary())


def module_bounds(num_tokens: int, num_gs: int) -> list[tuple[int, int]]:
    """The modules of a block as (lo, hi): a module reads tokens [lo, hi) and solves [lo + 1, hi + 1),
    the reference's split: T / num_gs tokens each, the last one a token short (token 0 is known)."""
    T = num_tokens
    n = T if num_gs == 0 else num_gs
    size = T // n
    bounds = [(i * size, (i + 1) * size if i < n - 1 else T - 1) for i in range(n)]
    return [(lo, hi) for lo, hi in bounds if hi > lo]


def _invert_block(block: MetaBlock, x: torch.Tensor, y, strategy: BlockStrategy, T: int, guide: Guidance | None,
                  ebound: float, clamp: float | None, kv_cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's inverse in the model's token order, and each sample's passes through it."""
    z = block.permute(x)
    B, _, D = z.shape
    exact = strategy.num_gs in (0, T)  # one exact pass per token: no clamp, no iteration
    if exact and not kv_cache:
        return _sequential_uncached(block, z, y, T, guide)
    out = z.clone()
    if strategy.guess == "zeros" and not exact:
        out[:, 1:] = 0
    modules = module_bounds(T, strategy.num_gs)
    max_iter = 1 if exact else strategy.max_iter
    bound = None if exact else clamp
    cache = KVCache(2 * B if guide else B, T) if len(modules) > 1 else None
    passes = torch.zeros(B, dtype=torch.long, device=z.device)
    everyone = torch.arange(B, device=z.device)
    for lo, hi in modules:
        active = everyone
        module_passes = torch.zeros_like(passes)
        while active.numel():
            rows = None if active.numel() == B else active  # plain slices while every sample iterates
            pick = slice(None) if rows is None else rows
            y_rows = None if y is None else y[pick]
            a, b = _next_params(block, out[pick, lo:hi], y_rows, cache, rows, guide, T, B)
            new = torch.exp(a) * z[pick, lo + 1:hi + 1] + b
            if bound is not None:
                new = new.clamp(-bound, bound)
            diff = (new - out[pick, lo + 1:hi + 1]).flatten(1).norm(dim=1) / D
            out[pick, lo + 1:hi + 1] = new
            module_passes[active] += 1
            active = active[(diff > ebound) & (module_passes[active] < max_iter)]
        passes += module_passes
        if cache is not None:
            cache.commit(hi - lo)
    return block.permute(out), passes


def _sequential_uncached(block, z, y, T, guide):
    """The sequential loop without a KV cache: step i runs the whole prefix 0..i again."""
    out = z.clone()
    for i in range(T - 1):
        a, b = _next_params(block, out[:, :i + 1], y, None, None, guide, T, z.shape[0])
        out[:, i + 1] = torch.exp(a[:, -1]) * z[:, i + 1] + b[:, -1]
    return block.permute(out), torch.full((z.shape[0],), T - 1, dtype=torch.long, device=z.device)


def _next_params(block: MetaBlock, x_in, y, cache: KVCache | None, rows, guide: Guidance | None, T: int,
                 batch: int):
    """(a, b) for the tokens after x_in's, guided when `guide` is set: conditional rows and
    unconditional rows (labels -1, rows batch + r of the cache) in one pass."""
    if guide is None:
        return block.transform(x_in, y, cache, rows)
    n, m = x_in.shape[0], x_in.shape[1]
    start = cache.length if cache is not None else 0
    x2 = torch.cat([x_in, x_in])
    y2 = torch.cat([y, torch.full_like(y, -1)])
    rows2 = None if rows is None else torch.cat([rows, rows + batch])
    temp = None
    if guide.attn_temp != 1.0:
        temp = torch.ones(2 * n, 1, 1, 1, dtype=x_in.dtype, device=x_in.device)
        temp[n:] = guide.attn_temp
    a2, b2 = block.transform(x2, y2, cache, rows2, temp)
    (a, a_u), (b, b_u) = a2.chunk(2), b2.chunk(2)
    g = guide.scale
    if guide.annealed:
        positions = torch.arange(start + 1, start + m + 1, dtype=x_in.dtype, device=x_in.device)
        g = (guide.scale * positions / (T - 1)).view(1, m, 1)
    if "a" in guide.what:
        a = a + g * (a - a_u)
    if "b" in guide.what:
        b = b + g * (b - b_u)
    return a, b


def _check(model, z, y, strategies, guidance, ebound, clamp, kv_cache) -> None:
    T, K = model.num_tokens, len(model.blocks)
    if tuple(z.shape[1:]) != model.data_shape:
        raise StepbenchError(f"TarFlow inverse: z must be [B, {', '.join(map(str, model.data_shape))}], "
                             f"got {list(z.shape)}")
    if len(strategies) != K:
        raise ConfigError(f"TarFlow inverse: {len(strategies)} block strategies for {K} blocks")
    for k, s in enumerate(strategies):
        if not isinstance(s.num_gs, int) or not 0 <= s.num_gs <= T or (s.num_gs and T % s.num_gs):
            divisors = [d for d in range(1, T + 1) if T % d == 0]
            raise ConfigError(f"block {k}: num_gs {s.num_gs!r} must be 0 (sequential) or divide the {T} tokens; "
                              f"valid: 0, {', '.join(map(str, divisors))}")
        if not isinstance(s.max_iter, int) or s.max_iter < 1:
            raise ConfigError(f"block {k}: max_iter must be an integer >= 1, not {s.max_iter!r}")
        if s.guess not in GUESSES:
            raise ConfigError(f"block {k}: guess {s.guess!r} unknown; valid: {', '.join(GUESSES)}")
        if not kv_cache and s.num_gs not in (0, T):
            raise ConfigError("kv_cache=False is the sequential loop's option only")
    if not isinstance(ebound, (int, float)) or ebound < 0:
        raise ConfigError(f"ebound must be a number >= 0, not {ebound!r}")
    if clamp is not None and (not isinstance(clamp, (int, float)) or clamp <= 0):
        raise ConfigError(f"clamp must be a positive number or None, not {clamp!r}")
    if guidance is not None and guidance.scale != 0:
        if model.config.num_classes == 0:
            raise ConfigError("guidance needs a class-conditional TarFlow (this one has num_classes 0)")
        if y is None:
            raise StepbenchError("guidance needs class labels y")
        if set(guidance.what) - {"a", "b"} or not guidance.what:
            raise ConfigError(f"guidance.what {guidance.what!r}: use a, b or ab")
    if y is not None and y.shape != (z.shape[0],):
        raise StepbenchError(f"class labels must be [B] = [{z.shape[0]}], got {list(y.shape)}")
