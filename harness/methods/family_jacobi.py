"""family: jacobi — sampling a normalizing flow (harness.models.flow, TarFlow) by inverting its blocks, exactly
or by parallel iteration (Liu & Qin 2025, "Accelerate TarFlow Sampling with GS-Jacobi Iteration").

    tarflow_sequential: {family: jacobi, procedure: sequential}
    tarflow_jacobi:     {family: jacobi, procedure: jacobi, params: {ebound: 1.0e-6}}
    tarflow_gs_jacobi:  {family: jacobi, procedure: gs_jacobi, params: {ebound: 1.0e-6, gs_modules: 8,
                                                                         tough_max_iter: 32, tough_factor: 1.5}}

The budget (the grid's `nfe`) is the number of sequential network passes per sample, counted by
harness.nfe.PassCounter and audited by harness.nfe.CountingDenoiser as NFE is: a sequential inverse is T - 1
single-token passes per block, a Jacobi iteration one pass over a block's tokens, TarFlow's final denoising step
one pass per block (the model's `denoise_passes`, 0 without the step). `network_evals` are token evaluations.
- `sequential` (the algorithms: harness.methods.jacobi_inverse): the exact inverse with a KV cache; its cost is
  fixed by the model, K (T - 1) + denoise_passes, the only budget it takes.
- `jacobi`: every block iterated in parallel from the guess `params.guess` ("z"), at most
  J = (nfe - denoise_passes) / K iterations per block (nfe must make J a whole number in 1..T-1), stopping per
  sample once an update's norm / D <= `ebound` (1e-6, the reference's; 0 runs exactly J). Iterates are clamped
  to [-clamp, clamp] as the reference does (3; null: no clamp).
- `gs_jacobi`: per-block strategies from CRM and IGM (harness.methods.jacobi_strategy) on the first
  `calibration_images` (1000) training images, a prepared artifact per (model, method): blocks whose CRM share is
  >= tough_factor / K are split into `gs_modules` modules of at most `tough_max_iter` iterations, and never more
  than a module's tokens, after which it is exact (gs_modules 0: sequential), each block starts from the guess with the smaller IGM; every other block gets
  floor((nfe - denoise_passes - the tough blocks' passes) / its count) iterations at most, so the budget is the
  worst case and what ran is measured. The artifact records the strategy in the paper's [Stack-GS-J-Else]
  notation and each block's CRM and IGM (the report's finding shows them).
The adaptive methods report the measured mean of passes per sample (nfe_measured), as adaptive solvers do.
Samples: z is the cell's SampleNoise (sample i's from (seed, i)), the labels the model's conditions.
"""

from __future__ import annotations

import hashlib

import torch

from harness.errors import ConfigError, StepbenchError, UnsupportedNFE, valid_names
from harness.methods.base import Sampler

PROCEDURES = {
    "sequential": (),
    "jacobi": ("ebound", "guess", "clamp"),
    "gs_jacobi": ("ebound", "clamp", "gs_modules", "tough_max_iter", "tough_factor", "norm", "calibration_images"),
}
DEFAULTS = {"ebound": 1e-6, "guess": "z", "clamp": 3.0, "gs_modules": 8, "tough_max_iter": 32, "tough_factor": 1.5,
            "norm": 2, "calibration_images": 1000}
CODE = ("methods/family_jacobi.py", "methods/jacobi_strategy.py", "models/tarflow.py", "models/flow.py")


class JacobiSampler(Sampler):
    family = "jacobi"
    model_kind = "flow"

    def __init__(self, spec: dict):
        super().__init__(spec)
        procedure, params = self.procedure_and_params(PROCEDURES)
        self.procedure = procedure
        self.params = {k: params.get(k, DEFAULTS[k]) for k in PROCEDURES[procedure]}
        self._check_params()
        self.prepare_scope = "model" if procedure == "gs_jacobi" else None
        self.prepared: dict | None = None

    def _check_params(self) -> None:
        p = self.params
        if "ebound" in p and (not isinstance(p["ebound"], (int, float)) or p["ebound"] < 0):
            raise ConfigError(f"key 'params.ebound': a number >= 0, not {p['ebound']!r}")
        for key in ("tough_max_iter", "calibration_images"):
            if key in p and (not isinstance(p[key], int) or p[key] < 1):
                raise ConfigError(f"key 'params.{key}': an integer >= 1, not {p[key]!r}")
        if "gs_modules" in p and (not isinstance(p["gs_modules"], int) or p["gs_modules"] < 0):
            raise ConfigError(f"key 'params.gs_modules': an integer >= 0, not {p['gs_modules']!r}")
        if "clamp" in p and p["clamp"] is not None and (not isinstance(p["clamp"], (int, float)) or p["clamp"] <= 0):
            raise ConfigError(f"key 'params.clamp': a positive number, or null for none, not {p['clamp']!r}")
        if "guess" in p:
            from harness.methods.jacobi_inverse import GUESSES

            if p["guess"] not in GUESSES:
                raise ConfigError(f"key 'params.guess': {p['guess']!r} unknown{valid_names(p['guess'], GUESSES)}")

    def summary(self) -> dict[str, str]:
        return {"family": self.family, "procedure": self.procedure, "NFE": "sequential network passes per sample",
                "side data": "per model (CRM, IGM)" if self.prepare_scope else "-",
                "params": ", ".join(f"{k}={v}" for k, v in self.params.items())}

    # ---- budgets ----------------------------------------------------------------------------------------

    def check_nfe(self, nfe: int) -> None:
        if nfe < 1:
            raise UnsupportedNFE(f"{self.procedure}: NFE (sequential passes) must be >= 1", "NFE < 1")

    def check_model(self, nfe: int, model_spec: dict) -> None:
        super().check_model(nfe, model_spec)
        from harness.models.flow import flow_budget

        blocks, tokens, denoise = flow_budget(model_spec)
        inverse = nfe - denoise
        if self.procedure == "sequential" and inverse != blocks * (tokens - 1):
            only = blocks * (tokens - 1) + denoise
            raise UnsupportedNFE(f"sequential inverse: {blocks} blocks x {tokens - 1} passes + {denoise} (denoising) "
                                 f"= NFE {only} only", f"exact inverse: NFE {only} only")
        if self.procedure == "jacobi" and (inverse % blocks or not 1 <= inverse // blocks <= tokens - 1):
            valid = [blocks * j + denoise for j in (1, 2, tokens // 4, tokens - 1)]
            raise UnsupportedNFE(f"jacobi: NFE - {denoise} must be {blocks} x J iterations, J in 1..{tokens - 1} "
                                 f"(e.g. {', '.join(map(str, valid))})", f"NFE = {blocks} J + {denoise} only")
        if self.procedure == "gs_jacobi" and inverse < blocks:
            raise UnsupportedNFE(f"gs_jacobi: NFE must leave each of {blocks} blocks a pass after the {denoise} of "
                                 "denoising", f"NFE >= {blocks + denoise}")

    def strategies(self, budget: tuple[int, int, int], nfe: int) -> list:
        """The per-block strategies (model.blocks order) this method runs at budget nfe on a model of
        budget = (blocks, tokens, denoise passes) (harness.models.flow.flow_budget)."""
        from harness.methods.jacobi_inverse import BlockStrategy, module_bounds

        blocks, tokens, denoise = budget
        inverse = nfe - denoise
        if self.procedure == "sequential":
            return [BlockStrategy(num_gs=0)] * blocks
        if self.procedure == "jacobi":
            return [BlockStrategy(1, inverse // blocks, self.params["guess"])] * blocks
        if self.prepared is None:
            raise RuntimeError("gs_jacobi needs its prepared artifact (harness.prepared.load)")
        chosen = self.prepared["strategy"]
        tough = [k for k in range(blocks) if chosen["num_gs"][k] != 1]
        tough_passes = sum(len(module_bounds(tokens, chosen["num_gs"][k]))
                           * (1 if chosen["num_gs"][k] in (0, tokens) else chosen["max_iter"][k]) for k in tough)
        others = blocks - len(tough)
        else_iter = (inverse - tough_passes) // others if others else 0
        if others and else_iter < 1:
            raise UnsupportedNFE(f"gs_jacobi: NFE {nfe} leaves nothing for the {others} non-tough blocks after the tough "
                                 f"blocks' {tough_passes} passes ({chosen['notation']})", "budget below the tough blocks'")
        return [BlockStrategy(chosen["num_gs"][k], chosen["max_iter"][k] if k in tough else else_iter,
                              chosen["guess"][k]) for k in range(blocks)]

    # ---- CRM and IGM: a prepared artifact ----------------------------------------------------------------

    def prepare(self, denoiser, nfe, calibration_seed):
        """CRM and IGM on the first `calibration_images` training images (with their labels); no noise drawn."""
        from harness.datasets import load_dataset
        from harness.methods.jacobi_strategy import block_metrics, choose_strategy
        from harness.models.flow import flow_of

        model = flow_of(denoiser)
        dataset = model.info.extra.get("dataset")
        if dataset is None:
            raise StepbenchError("gs_jacobi's CRM and IGM need the model's training images: give its entry a dataset")
        images, labels = load_dataset(dataset)
        n = min(self.params["calibration_images"], len(images))
        flow = model.flow
        param = next(flow.parameters())
        x = torch.as_tensor(images[:n], dtype=param.dtype)
        y = torch.as_tensor(labels[:n]) if flow.config.num_classes else None
        metrics = block_metrics(flow, x, y, norm=self.params["norm"])
        p = self.params
        # a module of m tokens is exact after m iterations (Jacobi's k-th iterate fixes its first k tokens): more
        # would only spend budget
        module_tokens = flow.num_tokens // p["gs_modules"] if p["gs_modules"] else 1
        strategy = choose_strategy(metrics, flow.num_tokens, gs_modules=p["gs_modules"],
                                   tough_max_iter=min(p["tough_max_iter"], module_tokens), else_max_iter=1,
                                   tough_factor=p["tough_factor"])
        return {"metrics": metrics, "strategy": strategy, "images": n, "dataset": dataset}

    def prepare_code(self) -> str:
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        digest = hashlib.sha256()
        for name in CODE:
            digest.update(name.encode() + b"\n" + (root / name).read_bytes())
        return digest.hexdigest()[:16]

    def use_prepared(self, artifact: dict) -> None:
        self.prepared = artifact

    def prepared_summary(self, artifact: dict, nfe: int, model_spec: dict) -> dict:
        """What cell.json (and the report's finding) shows of the artifact: the strategy this budget runs, in
        [Stack-GS-J-Else] notation, and each block's CRM share, CRM and IGMs."""
        from harness.methods.jacobi_strategy import strategy_notation, worst_case_passes
        from harness.models.flow import flow_budget

        budget = flow_budget(model_spec)
        ran = self.strategies(budget, nfe)
        num_gs, max_iter = [s.num_gs for s in ran], [s.max_iter for s in ran]
        metrics = artifact["metrics"]
        return {"notation": strategy_notation(num_gs, max_iter, budget[1]),
                "worst_case_passes": worst_case_passes(num_gs, max_iter, budget[1]) + budget[2],
                "tough_blocks": artifact["strategy"]["tough_blocks"], "guess": [s.guess for s in ran],
                "images": artifact["images"], "crm_share": [m["crm_share"] for m in metrics],
                "crm": [m["crm"] for m in metrics], "igm_z": [m["igm"]["z"] for m in metrics],
                "igm_zeros": [m["igm"]["zeros"] for m in metrics]}

    # ---- sampling ----------------------------------------------------------------------------------------

    def sample(self, denoiser, noise, nfe, cond=None, generator=None):
        from harness.models.flow import flow_of

        strategies = self.strategies(flow_of(denoiser).budget, nfe)
        ebound = 0.0 if self.procedure == "sequential" else float(self.params["ebound"])
        clamp = None if self.procedure == "sequential" else self.params["clamp"]
        with torch.no_grad():
            return denoiser.invert(noise, cond, strategies, ebound=ebound, clamp=clamp).x
