"""Plain-language findings the leaderboard states, each with the numbers it rests on.

A finding is a title, one sentence of verdict and a small table, computed from results.csv's rows alone
(ok cells with finite values), so the page says only what its numbers show. Each family of questions is one
function here; `all_findings` runs them in order. The page renders them; nothing here formats HTML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.report.layout import higher_is_better

QUALITY_METRICS = ("fid", "exact_err", "mse_ref", "kid")  # the first a model has judges its findings
LEARNED_RATIO = 5.0  # a trained model "learned the distribution" when its best FID is <= 1/5 of its baseline's
FEW_STEPS = (1, 2)  # where distilled students should beat every training-free solver


@dataclass
class Finding:
    title: str
    verdict: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    model: str | None = None  # the model section it belongs to; None: the overview


def _values(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = results[(results["metric"] == metric) & (results["status"] == "ok")]
    return rows[np.isfinite(rows["value"].astype(float))]


def _quality_metric(results: pd.DataFrame, model: str) -> str | None:
    present = set(results[results["model"] == model]["metric"].dropna())
    return next((m for m in QUALITY_METRICS if m in present), None)


def _best(values: pd.DataFrame, metric: str) -> pd.Series | None:
    if values.empty:
        return None
    return values.loc[values["value"].idxmax() if higher_is_better(metric) else values["value"].idxmin()]


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4g}"


def learned_the_distribution(results: pd.DataFrame, models: dict) -> list[Finding]:
    """A trained model against the analytic baseline its entry names (`baseline_model`), on FID."""
    found = []
    for model, spec in models.items():
        baseline = spec.get("baseline_model")
        if baseline is None or model not in set(results["model"]):
            continue
        fid = _values(results, "fid")
        ours, theirs = _best(fid[fid["model"] == model], "fid"), _best(fid[fid["model"] == baseline], "fid")
        if ours is None or theirs is None:
            verdict = f"not decided: no FID of {'both' if ours is None and theirs is None else (model if ours is None else baseline)} here"
        else:
            ratio = theirs["value"] / ours["value"] if ours["value"] > 0 else math.inf
            learned = ratio >= LEARNED_RATIO
            verdict = (f"{model} {'learned' if learned else 'did not learn'} the distribution beyond second-order "
                       f"statistics: its best FID is {ratio:.3g}x lower than {baseline}'s "
                       f"(the bar is {LEARNED_RATIO:g}x)")
        rows = [[name, row["method"], int(row["nfe"]), _fmt(row["value"])]
                for name, row in ((model, ours), (baseline, theirs)) if row is not None]
        found.append(Finding(f"Did {model} learn the distribution?", verdict, ["model", "best method", "NFE", "FID"],
                             rows, model))
    return found


def distillation_versus_solvers(results: pd.DataFrame, models: dict) -> list[Finding]:
    """A distilled student at 1-2 steps against every training-free solver of its teacher at the same NFE."""
    found = []
    for student, spec in models.items():
        teacher = (spec.get("train") or {}).get("teacher")
        if teacher is None or student not in set(results["model"]):
            continue
        metric = _quality_metric(results, student)
        if metric is None:
            continue
        values = _values(results, metric)
        rows, wins, decided = [], [], []
        for nfe in FEW_STEPS:
            ours = _best(values[(values["model"] == student) & (values["nfe"] == nfe)], metric)
            solvers = values[(values["model"] == teacher) & (values["nfe"] == nfe) & (values["family"] == "solver")]
            theirs = _best(solvers, metric)
            if ours is None or theirs is None:
                continue
            better = ours["value"] > theirs["value"] if higher_is_better(metric) else ours["value"] < theirs["value"]
            decided.append(nfe)
            wins += [nfe] if better else []
            rows.append([nfe, f"{ours['method']}: {_fmt(ours['value'])}",
                         f"{theirs['method']}: {_fmt(theirs['value'])}", "yes" if better else "no"])
        if not decided:
            verdict = f"not decided: {student} and {teacher}'s solvers have no common NFE in {FEW_STEPS}"
        elif len(wins) == len(decided):
            verdict = (f"distillation beats every training-free solver here: {student} is better than the best of "
                       f"{teacher}'s solvers at NFE {', '.join(map(str, decided))}")
        else:
            verdict = (f"distillation does not beat every training-free solver here: at NFE "
                       f"{', '.join(str(n) for n in decided if n not in wins)} one of {teacher}'s solvers does better")
        found.append(Finding(f"{student} versus {teacher}'s training-free solvers ({metric})", verdict,
                             ["NFE", f"{student} (best)", f"{teacher}, best solver", "student better"], rows, student))
    return found


def stitching_versus_large_model(results: pd.DataFrame, methods: dict) -> list[Finding]:
    """Each stitched method beside its base solver on the large model alone, at the same NFE, in one run."""
    stitched = [m for m, s in methods.items() if s.get("family") == "stitch"]
    found = []
    for model in sorted(set(results[results["method"].isin(stitched)]["model"])):
        metric = _quality_metric(results, model)
        quality = _values(results, metric) if metric else results.iloc[0:0]
        cost = {name: _values(results, name) for name in ("wall_s_per_sample", "gflops_per_sample")}

        def value(table, method, nfe):
            hit = table[(table["model"] == model) & (table["method"] == method) & (table["nfe"] == nfe)]
            return float(hit["value"].iloc[0]) if len(hit) else None

        rows, cheaper_as_good = [], []
        for method in stitched:
            base, fraction = methods[method]["stitch"]["base"], methods[method]["stitch"]["fraction"]
            for nfe in sorted(set(results[(results["model"] == model) & (results["method"] == method)]["nfe"])):
                q, q0 = value(quality, method, nfe), value(quality, base, nfe)
                w, w0 = value(cost["wall_s_per_sample"], method, nfe), value(cost["wall_s_per_sample"], base, nfe)
                g, g0 = value(cost["gflops_per_sample"], method, nfe), value(cost["gflops_per_sample"], base, nfe)
                if q is None or q0 is None:
                    continue
                rows.append([method, f"{fraction:g}", int(nfe), f"{_fmt(q)} vs {_fmt(q0)}",
                             f"{_fmt(w)} vs {_fmt(w0)}", f"{_fmt(g)} vs {_fmt(g0)}",
                             _fmt(w0 / w) if w and w0 else "—"])
                if g is not None and g0 is not None and g < g0 and q <= q0 * 1.1:
                    cheaper_as_good.append(f"{method} at NFE {int(nfe)}")
        if not rows:
            continue
        verdict = (f"stitching saves FLOPs at a quality within 10% of the large model alone for "
                   f"{', '.join(cheaper_as_good)}" if cheaper_as_good else
                   "no stitched method kept the large model's quality within 10% while saving FLOPs here")
        found.append(Finding(f"T-Stitch on {model} ({metric}; stitched vs large model alone, same run)", verdict,
                             ["method", "fraction", "NFE", metric, "wall s/sample", "GFLOPs/sample",
                              "speed-up (wall)"], rows, model))
    return found


SINGLESTEP = ("dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_3s")  # high-order singlestep solvers
MULTISTEP_CLAIMED = "dpmpp_2m"


def guidance_claim(results: pd.DataFrame, methods: dict) -> list[Finding]:
    """DPM-Solver++'s claim (Lu et al. 2022): at large guidance scales high-order singlestep solvers degrade while
    DPM-Solver++(2M) stays stable. Per scale: each singlestep solver's FID against dpmpp_2m's at the same NFE.
    The claim holds at a scale where dpmpp_2m is better than every singlestep solver there."""
    fid = _values(results, "fid").copy()
    fid["guidance"] = fid["guidance"].fillna(1.0)
    solver_of = {m: s.get("solver") for m, s in methods.items()
                 if s.get("family") == "solver" and not s.get("thresholding")}
    found = []
    for model in sorted(set(fid["model"])):
        rows = fid[fid["model"] == model]
        if rows["guidance"].nunique() < 2:
            continue
        table, sentences = [], []
        for scale in sorted(set(rows["guidance"])):
            at = rows[rows["guidance"] == scale]
            compared = []
            for single in [m for m in sorted(set(at["method"])) if solver_of.get(m) in SINGLESTEP]:
                for nfe in sorted(set(at[at["method"] == single]["nfe"])):
                    ours = at[(at["method"] == single) & (at["nfe"] == nfe)]["value"]
                    theirs = at[(at["method"] == MULTISTEP_CLAIMED) & (at["nfe"] == nfe)]["value"]
                    if len(ours) and len(theirs):
                        compared.append((single, int(nfe), float(ours.iloc[0]), float(theirs.iloc[0])))
                        table.append([f"{scale:g}", single, int(nfe), _fmt(float(ours.iloc[0])),
                                      _fmt(float(theirs.iloc[0]))])
            if compared:
                holds = all(multi < single_fid for _, _, single_fid, multi in compared)
                sentences.append(f"w={scale:g}: {'holds' if holds else 'does not hold'} ("
                                 + ", ".join(f"{m} {_fmt(a)} vs dpmpp_2m {_fmt(b)} at NFE {n}" for m, n, a, b in compared)
                                 + ")")
        if sentences:
            found.append(Finding(f"DPM-Solver++'s guided-sampling claim on {model} (FID)",
                                 "'high-order singlestep solvers degrade at large guidance while DPM-Solver++(2M) stays "
                                 "stable' " + "; ".join(sentences),
                                 ["guidance", "singlestep solver", "NFE", "its FID", "dpmpp_2m FID"], table, model))
    return found


EXACT_SEQUENTIAL = "sequential"  # the jacobi family's exact inverse (its procedure), every flow's baseline
INVERSION_RMS = 1e-4  # "reproduces the sequential samples": RMS per dimension from them at most this


def parallel_inversion(results: pd.DataFrame, methods: dict) -> list[Finding]:
    """Each flow's Jacobi and GS-Jacobi cells beside its exact sequential inverse from the same noise, in the same
    run: sequential passes (the budget and what was measured), token evaluations, wall time and the speed-up,
    the RMS distance per dimension to the sequential samples (sqrt mse_ref, the sequential method being the
    model's reference) and FID."""
    procedure = {m: s.get("procedure") for m, s in methods.items() if s.get("family") == "jacobi"}
    found = []
    ok = results[results["status"] == "ok"]
    for model in sorted(set(ok[ok["method"].isin(list(procedure))]["model"])):
        rows = ok[ok["model"] == model]

        def metric(method, nfe, name):
            hit = rows[(rows["method"] == method) & (rows["nfe"] == nfe) & (rows["metric"] == name)]["value"]
            return float(hit.iloc[0]) if len(hit) and math.isfinite(hit.iloc[0]) else None

        cells = rows[rows["method"].isin(list(procedure))].drop_duplicates(["method", "nfe"])
        baseline = cells[cells["method"].map(procedure) == EXACT_SEQUENTIAL]
        if baseline.empty:
            continue
        base = baseline.iloc[0]
        base_wall = metric(base["method"], base["nfe"], "wall_s_per_sample")
        table, reproduced = [], []
        ordered = sorted((cell for _, cell in cells.iterrows()),  # the baseline first
                         key=lambda c: (procedure[c["method"]] != EXACT_SEQUENTIAL, c["method"], c["nfe"]))
        for cell in ordered:
            method, nfe = cell["method"], cell["nfe"]
            wall, mse, fid = (metric(method, nfe, name) for name in ("wall_s_per_sample", "mse_ref", "fid"))
            rms = math.sqrt(mse) if mse is not None else None
            speedup = base_wall / wall if base_wall and wall else None
            table.append([method, int(nfe), _fmt(cell["nfe_measured"]), _fmt(cell["network_evals"]), _fmt(wall),
                          _fmt(speedup), _fmt(rms), _fmt(fid)])
            if (procedure[method] != EXACT_SEQUENTIAL and rms is not None and rms <= INVERSION_RMS
                    and cell["nfe_measured"] < base["nfe_measured"]):
                faster = speedup is not None and speedup > 1
                reproduced.append(f"{method} at NFE {int(nfe)} ({_fmt(cell['nfe_measured'])} passes, "
                                  f"{_fmt(speedup)}x the sequential speed: {'faster' if faster else 'slower'} in wall "
                                  "time here)")
        verdict = (f"parallel inversion reproduces the sequential samples (RMS <= {INVERSION_RMS:g}) with fewer "
                   f"sequential passes than its {_fmt(base['nfe_measured'])}: {'; '.join(reproduced)}" if reproduced
                   else f"no parallel inversion came within RMS {INVERSION_RMS:g} of the sequential samples with fewer "
                        "passes here")
        verdict += ("; fewer sequential passes pay in wall time only where a pass over many tokens costs about what a "
                    "single-token pass does (a GPU); the token evaluations show the extra work")
        found.append(Finding(f"Jacobi and GS-Jacobi inversion of {model} versus its exact sequential inverse (same noise, "
                             "same run)", verdict,
                             ["method", "NFE (pass budget)", "passes measured", "token evals/sample", "wall s/sample",
                              f"speed-up vs {base['method']}", "RMS from sequential", "FID"], table, model))
    return found


def jacobi_strategies(prepared: dict, methods: dict) -> list[Finding]:
    """The per-block CRM and IGM of each GS-Jacobi method's prepared artifact and the strategy each budget ran,
    in the paper's [Stack-GS-J-Else] notation (from the cells' records of their artifacts)."""
    found = []
    for (model, method), by_nfe in sorted((prepared or {}).items()):
        if methods.get(method, {}).get("family") != "jacobi" or not by_nfe:
            continue
        first = next(iter(by_nfe.values()))
        rows = [[k, f"{share:.1%}", _fmt(crm), _fmt(z), _fmt(zeros), first["guess"][k],
                 "tough" if k in first["tough_blocks"] else ""]
                for k, (share, crm, z, zeros) in enumerate(zip(first["crm_share"], first["crm"], first["igm_z"],
                                                               first["igm_zeros"]))]
        ran = "; ".join(f"NFE {nfe}: {summary['notation']} (worst case {summary['worst_case_passes']} passes)"
                        for nfe, summary in sorted(by_nfe.items()))
        tough = first["tough_blocks"]
        verdict = (f"CRM on {first['images']} training images marks block{'s' if len(tough) > 1 else ''} "
                   f"{', '.join(map(str, tough))} tough" if tough else
                   f"CRM on {first['images']} training images marks no block tough (none dominates)") + f"; ran {ran}"
        found.append(Finding(f"{method} on {model}: per-block CRM and IGM (block 0 first)", verdict,
                             ["block", "CRM share", "CRM", "IGM (guess z)", "IGM (guess zeros)", "guess", ""],
                             rows, model))
    return found


def quantisation(results: pd.DataFrame, methods: dict) -> list[Finding]:
    """Each quantised method beside its full-precision base solver at the same NFE, in one run: wall-clock speed-up
    (a slowdown shows as < 1; none for simulated schemes), network size, FID change and mse_fp32; and which time-step
    calibration (uniform, ptq4dm_normal) is closer to full precision at the same scheme."""
    quantised = {m: s["quantized"] for m, s in methods.items() if s.get("family") == "quantized"}
    found = []
    for model in sorted(set(results[results["method"].isin(list(quantised))]["model"])):
        tables = {name: _values(results, name) for name in ("wall_s_per_sample", "model_bytes", "fid", "mse_fp32")}

        def value(name, method, nfe):
            table = tables[name]
            hit = table[(table["model"] == model) & (table["method"] == method) & (table["nfe"] == nfe)]
            return float(hit["value"].iloc[0]) if len(hit) else None

        rows, by_calibration = [], {}
        for method, q in quantised.items():
            for nfe in sorted(set(results[(results["model"] == model) & (results["method"] == method)]["nfe"])):
                simulated = bool(q.get("simulate"))
                w, w0 = value("wall_s_per_sample", method, nfe), value("wall_s_per_sample", q["base"], nfe)
                fid, fid0 = value("fid", method, nfe), value("fid", q["base"], nfe)
                mse, size = value("mse_fp32", method, nfe), value("model_bytes", method, nfe)
                calibration = (q.get("calibration") or {}).get("timesteps", "—")
                speed = "— (simulated)" if simulated else (_fmt(w0 / w) if w and w0 else "—")
                rows.append([method, q["scheme"] + (" (simulated)" if simulated else ""), calibration, int(nfe), speed,
                             _fmt(size / 1e6) if size else "—",
                             f"{fid - fid0:+.3g}" if fid is not None and fid0 is not None else "—", _fmt(mse)])
                if calibration != "—" and mse is not None:
                    by_calibration.setdefault((q["base"], q["scheme"], simulated, int(nfe)), {})[calibration] = mse
        if not rows:
            continue
        pairs = [v for v in by_calibration.values() if {"uniform", "ptq4dm_normal"} <= set(v)]
        wins = sum(v["uniform"] < v["ptq4dm_normal"] for v in pairs)
        if not pairs:
            verdict = "calibrations not compared: no scheme here has both uniform and ptq4dm_normal cells"
        else:
            better = "uniform" if wins * 2 > len(pairs) else "ptq4dm_normal" if wins * 2 < len(pairs) else "neither"
            verdict = (f"{better} time-step calibration is closer to full precision here (lower mse_fp32 in "
                       f"{max(wins, len(pairs) - wins)} of {len(pairs)} base solver/NFE pairs at the same scheme); "
                       "speed-up is the base solver's fp32 cell's wall time over the quantised cell's, same run")
        found.append(Finding(f"Quantisation on {model} (against the fp32 base solver, same noise, same run)", verdict,
                             ["method", "scheme", "calibration", "NFE", "speed-up (wall)", "size (MB)", "FID change",
                              "mse_fp32"], rows, model))
    return found


def all_findings(results: pd.DataFrame, models: dict, methods: dict, prepared: dict | None = None) -> list[Finding]:
    """`prepared`: (model, method) -> {nfe: the summary a cell recorded of its prepared artifact}."""
    unguided = results[results["guidance"].fillna(1.0) == 1.0]
    return [*learned_the_distribution(unguided, models), *distillation_versus_solvers(unguided, models),
            *stitching_versus_large_model(unguided, methods), *guidance_claim(results, methods),
            *parallel_inversion(unguided, methods), *jacobi_strategies(prepared, methods),
            *quantisation(unguided, methods)]
