"""Per-block GS-Jacobi strategies from the paper's two metrics (Liu & Qin 2025; reference code
Minokori/GS-Jacobi_for_TarFlow, GS_Jacobi_sampling.MetaBlock.forward in detect_mode, IGM_GRM.py).

Both come from one forward pass of about 1000 training images; for block k with input x (its own
token order), output z, and alpha = exp(-a(x)) the scale of its forward map:

- IGM (initial guessing metric): how far one Jacobi update from a starting guess x0 lands from the
  true x, ||mean_batch(exp(a(x0)) z + b(x0) - x)||, for x0 = z ("z") and x0 = (x_0, 0, ..., 0)
  ("zeros"). The smaller one picks the block's initial guess.
- CRM (convergence ranking metric): ||mean_batch(alpha * x)|| ||W_s|| + ||W_u||, with W_s and W_u the
  halves of the output projection that make a and b. Blocks with a dominant share of the total CRM
  are "tough" and get GS segmentation.

Norms are matrix norms of [T, D] (and [D, channels]) matrices, ord 2 (the spectral norm) by default,
as the reference's `torch.linalg.norm(..., ord=norm)`; 1 and "fro" are its other choices. As the
reference runs it: images without noise augmentation, the forward pass with the labels given (None
in IGM_GRM.py), the IGM updates always with the unconditional (mean) class embedding, no clamping.
Unlike it: values are not rounded to two decimals.

The strategy notation [Stack-GS-J-Else] (README of the reference): Stack the tough blocks (block
index, model.blocks order), GS their number of modules (T for a sequential block), J their maximum
iterations per module (1 for a sequential block), Else the maximum iterations of every other block;
several tough blocks are joined with "/", and a field whose values agree is written once:
[6-8-32-10], [0/6-8-32-20], [0/7-256/8-1/13-6].

The tough-block rule, which the paper states only by example ("one or two blocks dominate"): a block
is tough when its CRM share is at least `tough_factor` / K (K blocks), 1.5 / K by default. On the
CRM tables the reference's README publishes for its four 8-block models any factor in (0.88, 2.69)
picks the blocks their strategies segment ({6}, {7}, {0, 6}, {0}), except Img64cond's block 7
(10.5 %), which the authors segment too (tests/test_jacobi_inverse.py checks it at the default). On
digits-tarflow (4 blocks) no block dominates: shares 14.9, 20.1, 28.1, 36.9 %, so the default picks
none (block 3 misses 1.5 / 4 = 37.5 % narrowly); its blocks' mean Jacobi iterations to ebound 1e-6
were 11.2, 14.2, 18.5, 17.2 (1000 samples), close to one another, and CRM ranks the two toughest the
other way round. IGM picks "z" for every block there (0.13 against 1.90 for block 0). The digits-tarflow the
workflow trains (models.yaml, key 9bde5c258b1f5d3a) has shares 14.6, 19.7, 27.8, 37.9 %: block 3 clears the
bar as narrowly as the trial's missed it, so the default segments it (the default grid runs [3-8-8-10] and
[3-8-8-21]), and its 8 modules of 8 tokens then take 62.3 passes per sample (each module iterates to
exactness) against 14.9 for Jacobi capped at 16 (250 samples; harness.methods.family_jacobi).

Checked side by side with the reference (Minokori/GS-Jacobi_for_TarFlow 4593d3f, its Model in
detect_mode, run outside the repository, with only its np.round(., 2) removed) on the random
4-block TarFlow of harness.methods.jacobi_inverse's docstring and the first 1000 digits: max relative
difference of CRM and both IGMs 4.1e-16 in float64 (its .float() casts removed too) for norm 2, 4.0e-16
for norm 1, 1.9e-16 for "fro"; 2.5e-7 in float32 with the file otherwise unmodified. On the trained
digits-tarflow, the same 1000 digits: 0 (norm 2), 2.7e-16 (1, "fro") in float64, <= 2.0e-7 in float32.
"""

from __future__ import annotations

from typing import Sequence

import torch

from harness.errors import ConfigError
from harness.methods.jacobi_inverse import GUESSES, module_bounds
from harness.models.tarflow import TarFlow, shift_one_token

NORMS = (2, 1, "fro")


def block_metrics(model: TarFlow, images: torch.Tensor, labels: torch.Tensor | None = None, *, norm=2,
                  batch_size: int = 1000) -> list[dict]:
    """IGM and CRM of every block (model.blocks order) from images [N, C, H, W] in data space.

    Returns JSON-able dicts: {"block", "igm": {"z", "zeros"}, "crm", "crm_share",
    "crm_parts": {"scaled_input", "w_scale", "w_shift"}}. Means over the images are accumulated in
    batches of `batch_size`, so the result does not depend on it (up to rounding)."""
    if norm not in NORMS:
        raise ConfigError(f"norm {norm!r} unknown; valid: {', '.join(map(str, NORMS))}")
    K, N = len(model.blocks), images.shape[0]
    param = next(model.parameters())
    sums = {name: [None] * K for name in ("igm_z", "igm_zeros", "scaled_input")}
    with torch.no_grad():
        for start in range(0, N, batch_size):
            x = model.patchify(images[start:start + batch_size].to(param))
            y = None if labels is None else labels[start:start + batch_size].to(param.device)
            for k, block in enumerate(model.blocks):
                xp = block.permute(x)
                a, b = (shift_one_token(t) for t in block.transform(xp, y))
                alpha = torch.exp(-a)
                zp = (xp - b) * alpha
                first_then_zeros = torch.cat([xp[:, :1], torch.zeros_like(xp[:, 1:])], dim=1)
                for name, guess in (("igm_z", zp), ("igm_zeros", first_then_zeros)):
                    a0, b0 = (shift_one_token(t) for t in block.transform(guess, None))
                    _accumulate(sums[name], k, (torch.exp(a0) * zp + b0 - xp).sum(dim=0))
                _accumulate(sums["scaled_input"], k, (alpha * xp).sum(dim=0))
                x = block.permute(zp)
    out = []
    for k, block in enumerate(model.blocks):
        w_scale, w_shift = _output_halves(block)
        parts = {"scaled_input": _matrix_norm(sums["scaled_input"][k] / N, norm),
                 "w_scale": _matrix_norm(w_scale, norm), "w_shift": _matrix_norm(w_shift, norm)}
        out.append({"block": k,
                    "igm": {"z": _matrix_norm(sums["igm_z"][k] / N, norm),
                            "zeros": _matrix_norm(sums["igm_zeros"][k] / N, norm)},
                    "crm": parts["scaled_input"] * parts["w_scale"] + parts["w_shift"],
                    "crm_parts": parts})
    total = sum(m["crm"] for m in out)
    for m in out:
        m["crm_share"] = m["crm"] / total
    return out


def _accumulate(sums: list, k: int, value: torch.Tensor) -> None:
    sums[k] = value if sums[k] is None else sums[k] + value


def _output_halves(block) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_s, W_u): the rows of proj_out that make a and b. A volume-preserving block has no a."""
    w = block.proj_out.weight
    return w.chunk(2, dim=0) if block.nvp else (torch.zeros_like(w), w)


def _matrix_norm(m: torch.Tensor, norm) -> float:
    return float(torch.linalg.matrix_norm(m.detach().double(), ord=norm))


def choose_strategy(metrics: Sequence[dict], num_tokens: int, *, gs_modules: int = 8, tough_max_iter: int = 32,
                    else_max_iter: int = 10, tough_factor: float = 1.5) -> dict:
    """The per-block strategy from block_metrics: tough blocks (CRM share >= tough_factor / K) in
    `gs_modules` modules of at most `tough_max_iter` iterations, every other block pure Jacobi of at
    most `else_max_iter`; each block's initial guess the one with the smaller IGM. gs_modules 0 makes
    the tough blocks sequential. Returns JSON-able lists in model.blocks order, with the notation and
    the worst-case passes per sample."""
    K = len(metrics)
    if gs_modules != 0 and (gs_modules < 1 or num_tokens % gs_modules):
        raise ConfigError(f"gs_modules {gs_modules} must be 0 or divide the {num_tokens} tokens")
    for name, value in (("tough_max_iter", tough_max_iter), ("else_max_iter", else_max_iter)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, not {value!r}")
    tough = [m["block"] for m in metrics if m["crm_share"] >= tough_factor / K]
    num_gs = [gs_modules if k in tough else 1 for k in range(K)]
    max_iter = [(1 if gs_modules == 0 else tough_max_iter) if k in tough else else_max_iter for k in range(K)]
    guess = [min(GUESSES, key=lambda g: m["igm"][g]) for m in metrics]
    return {"num_gs": num_gs, "max_iter": max_iter, "guess": guess, "tough_blocks": tough,
            "notation": strategy_notation(num_gs, max_iter, num_tokens),
            "worst_case_passes": worst_case_passes(num_gs, max_iter, num_tokens),
            "rule": {"gs_modules": gs_modules, "tough_max_iter": tough_max_iter, "else_max_iter": else_max_iter,
                     "tough_factor": tough_factor}}


def strategy_notation(num_gs: Sequence[int], max_iter: Sequence[int], num_tokens: int) -> str:
    """[Stack-GS-J-Else] for per-block lists in model.blocks order (see the module docstring)."""
    tough = [k for k, n in enumerate(num_gs) if n != 1]
    modules = [num_tokens if num_gs[k] == 0 else num_gs[k] for k in tough]
    iters = [1 if num_gs[k] in (0, num_tokens) else max_iter[k] for k in tough]
    others = [max_iter[k] for k, n in enumerate(num_gs) if n == 1]

    def field(values) -> str:
        return "-" if not values else str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))

    if not tough:
        return f"[J-{field(others)}]"
    return f"[{'/'.join(map(str, tough))}-{field(modules)}-{field(iters)}-{field(others)}]"


def worst_case_passes(num_gs: Sequence[int], max_iter: Sequence[int], num_tokens: int) -> int:
    """Sequential passes per sample if no module stops before its maximum."""
    total = 0
    for n, m in zip(num_gs, max_iter):
        modules = len(module_bounds(num_tokens, n))
        total += modules if n in (0, num_tokens) else modules * m
    return total
