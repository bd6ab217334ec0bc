"""How much of a grid's wall time is useful work: network evaluations, metric computations and training.

Runs the default grid (or a grid file) from a copy of this checkout in a scratch directory, with fresh
workers and caches, as a fresh clone would. Every stepbench command records its wall time and the seconds
it spent inside network evaluations, metrics and training (harness/accounting.py); the sum of the useful
seconds over the grid's wall time times the cores is the grid's efficiency:

    grid_efficiency = sum(useful core-seconds) / (wall seconds x cores)

It also times each job kind's imports in a fresh process (what a job paid before warm workers), and with
--baseline-rev runs the same grid side by side from another revision (a fresh clone of it), e.g. the commit
before warm workers, to print the wall-time ratio.

    python benchmarks/grid_efficiency.py [--configfile grid.yaml] [--cores 2] [--baseline-rev f17365d]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_checkout(target: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, as a fresh clone plus local edits."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_grid(checkout: Path, cores: int, configfile: Path | None, env: dict[str, str]) -> float:
    command = [str(BIN / "snakemake"), "--cores", str(cores), *(["--configfile", str(configfile)] if configfile else [])]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"grid failed in {checkout}:\n{run.stderr[-3000:]}")
    return wall


def ledger_totals(folder: Path) -> tuple[dict[str, float], dict[str, list[float]]]:
    useful: dict[str, float] = collections.Counter()
    per_command: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for path in folder.glob("*.json"):
        record = json.loads(path.read_text())
        command = (record["command"] or ["?"])[0]
        row = per_command[command]
        row[0] += 1
        row[1] += record["wall_s"]
        row[2] += sum(record["useful_s"].values())
        for kind, seconds in record["useful_s"].items():
            useful[kind] += seconds
    return dict(useful), dict(per_command)


def import_seconds(checkout: Path, argv: list[str], env: dict[str, str]) -> tuple[float, list[str]]:
    """Import time of one command in a fresh process (python -X importtime), and which heavy modules it
    imported."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness.cli", *argv], cwd=checkout,
                         env={**env, "STEPBENCH_WORKERS": "0"}, capture_output=True, text=True)
    total, heavy = 0.0, []
    for line in run.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if not match:
            continue
        microseconds, indent, module = int(match.group(1)), len(match.group(2)), match.group(3)
        if indent == 1:  # top-level imports: their cumulative time covers the rest
            total += microseconds / 1e6
        if module in ("torch", "torch_fidelity", "torchvision", "torch._dynamo", "diffusers", "matplotlib"):
            heavy.append(module)
    return total, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", type=Path, default=None, help="grid file (default: the default grid)")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--baseline-rev", default=None, help="also run the grid from this git revision")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="stepbench-grid-"))
    configfile = args.configfile.resolve() if args.configfile else None
    # a fresh machine's caches: torch.compile's (inductor) and harness.noise_native's build start empty
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor-cache"), "STEPBENCH_NATIVE_CACHE": str(scratch / "native")}
    env.pop("STEPBENCH_WORKERS", None)
    try:
        checkout = scratch / "current"
        copy_checkout(checkout)
        ledger = scratch / "ledger"
        wall = run_grid(checkout, args.cores, configfile,
                        {**env, "STEPBENCH_LEDGER": str(ledger), "STEPBENCH_WORKER_DIR": str(scratch / "workers")})
        useful, per_command = ledger_totals(ledger)

        print(f"grid: {configfile or 'profiles/default/grid.yaml'}, {args.cores} cores")
        print(f"{'command':<12}{'jobs':>6}{'wall s':>10}{'useful s':>10}")
        for command, (count, seconds, useful_s) in sorted(per_command.items()):
            print(f"{command:<12}{count:>6}{seconds:>10.1f}{useful_s:>10.1f}")
        for kind, seconds in sorted(useful.items()):
            print(f"useful_{kind}_s={seconds:.1f}")
        print(f"wall_s={wall:.1f}")

        cells = sorted((checkout / "results" / "cells").glob("*/*/*/seed*"))
        cache = str(checkout / "results" / "cache")  # the grid's: a cell finds its model's FLOP count there
        probes = {"sample": ["sample", "--model", "gmm2d", "--method", "euler", "--nfe", "4", "--num-samples", "1000",
                             "--out", str(scratch / "probe"), "--cache-dir", cache]}
        digits = [c for c in cells if c.parts[-4] == "digits-ideal"]
        if digits:
            probes["evaluate"] = ["evaluate", str(digits[0]), "--cache-dir", cache, "--metrics", "fid,kid,is"]
        probes["report"] = ["report", str(checkout / "results"), "--out", str(scratch / "probe-report")]
        for kind, argv in probes.items():
            seconds, heavy = import_seconds(checkout, argv, env)
            print(f"imports_{kind}_s={seconds:.2f} ({', '.join(heavy) or 'no torch'}) in a fresh process")

        if args.baseline_rev:
            baseline = scratch / "baseline"
            subprocess.run(["git", "clone", "-q", str(REPO), str(baseline)], check=True)
            subprocess.run(["git", "checkout", "-q", args.baseline_rev], cwd=baseline, check=True)
            # this venv's editable install points at the current checkout: PYTHONPATH puts the baseline's own
            # harness first, for the Snakefile and for every `stepbench` job it starts
            baseline_env = {**env, "PYTHONPATH": str(baseline)}
            found = subprocess.run([sys.executable, "-c", "import harness; print(harness.__file__)"], cwd=scratch,
                                   env=baseline_env, capture_output=True, text=True, check=True).stdout.strip()
            if not found.startswith(str(baseline)):
                sys.exit(f"the baseline would import harness from {found}, not from its clone {baseline}")
            baseline_wall = run_grid(baseline, args.cores, configfile, baseline_env)
            print(f"baseline_wall_s={baseline_wall:.1f} (revision {args.baseline_rev})")
            print(f"wall_ratio_vs_baseline={wall / baseline_wall:.3f}")
        print(f"grid_efficiency={sum(useful.values()) / (wall * args.cores):.3f}")
    finally:
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
