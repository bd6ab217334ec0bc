"""stepbench command line: sample | evaluate | report | reference | methods (the cell contract of DESIGN.md).

Bad input exits non-zero with one line naming the file, the key and what would be valid.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from harness.errors import StepbenchError

DEFAULT_CACHE = Path(os.environ.get("STEPBENCH_CACHE", Path.home() / ".cache" / "stepbench"))

models_file_opt = click.option("--models-file", type=click.Path(path_type=Path), default=Path("models.yaml"),
                               show_default=True, help="Model zoo to read ids from.")
methods_file_opt = click.option("--methods-file", type=click.Path(path_type=Path), default=Path("methods.yaml"),
                                show_default=True, help="Accelerators to read ids from.")
cache_opt = click.option("--cache-dir", type=click.Path(path_type=Path), default=DEFAULT_CACHE, show_default=True,
                         help="Cached reference statistics, reference solutions and embedded weights "
                              "(env STEPBENCH_CACHE).")
device_opt = click.option("--device", default=None, help="torch device; default: cuda if available, else cpu.")


@click.group()
def cli() -> None:
    """stepbench: compare fast samplers of diffusion models fairly (paired noise, audited NFE)."""


@cli.command()
@click.option("--model", "model_id", required=True, help="Model id from the models file.")
@click.option("--method", "method_id", required=True, help="Method id from the methods file.")
@click.option("--nfe", type=click.IntRange(min=1), required=True, help="Network evaluations per sample.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Cell directory to write.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None,
              help="Samples to draw [default: the model's num_samples].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample i uses noise from (seed, i) only.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Samples per batch; does not change the samples.")
@click.option("--keep-noise", is_flag=True, help="Also store the initial noise in samples.npz.")
@click.option("--guidance", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Classifier-free guidance scale (1: the conditional model alone).")
@models_file_opt
@methods_file_opt
@cache_opt
@device_opt
def sample(model_id, method_id, nfe, out, num_samples, seed, batch_size, keep_noise, guidance, models_file,
           methods_file, cache_dir, device):
    """Generate one cell: OUT/samples.npz and OUT/cell.json.

    Example: stepbench sample --model gmm2d --method heun --nfe 9 --out results/cells/gmm2d/heun/nfe9
    """
    from harness.cells import run_cell
    from harness.config import load_methods, load_models, lookup

    models, methods = load_models(models_file), load_methods(methods_file)
    model_spec = lookup(models, model_id, models_file, "model")
    method_spec = lookup(methods, method_id, methods_file, "method")
    cell = run_cell(model_id, model_spec, method_id, method_spec, nfe, out,
                    num_samples or model_spec.get("num_samples", 1000), seed, batch_size, keep_noise, device,
                    cache_dir, models, guidance)
    scale = f" / guidance {guidance:g}" if guidance != 1 else ""
    click.echo(f"{model_id} / {method_id} / NFE {nfe}{scale}: {cell['status']}, nfe_measured={cell['nfe_measured']:g}, "
               f"{cell['wall_s']:.2f}s -> {out}")


@cli.command()
@click.argument("cell_dir", type=click.Path(path_type=Path))
@click.option("--metrics", "metric_list", default=None,
              help="Comma-separated metric names [default: the model's metrics in the models file].")
@models_file_opt
@methods_file_opt
@cache_opt
@device_opt
def evaluate(cell_dir, metric_list, models_file, methods_file, cache_dir, device):
    """Compute metrics of a sampled cell: CELL_DIR/metrics.json."""
    from harness.config import load_methods, load_models, lookup
    from harness.evaluate import evaluate_cell
    from harness.models import resolve_device

    cell_json = cell_dir / "cell.json"
    if not cell_json.is_file():
        raise StepbenchError(f"{cell_json}: file not found (run `stepbench sample` first)")
    model_id = json.loads(cell_json.read_text())["model"]
    model_spec = lookup(load_models(models_file), model_id, models_file, "model")
    names = [m.strip() for m in metric_list.split(",") if m.strip()] if metric_list else model_spec["metrics"]
    result = evaluate_cell(cell_dir, model_spec, load_methods(methods_file), names, cache_dir,
                           resolve_device(device))
    click.echo(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in result.items() if k in names))


@cli.command()
@click.option("--model", "model_id", required=True, help="Model id from the models file.")
@click.option("--method", "method_id", required=True, help="Method id from the methods file.")
@click.option("--nfe", type=click.IntRange(min=1), required=True,
              help="The cell's NFE (ignored by methods whose side data does not depend on it).")
@models_file_opt
@methods_file_opt
@cache_opt
@device_opt
def prepare(model_id, method_id, nfe, models_file, methods_file, cache_dir, device):
    """Compute a method's prepared artifact (statistics, fitted ratios, searched schedule) once."""
    from harness import prepared
    from harness.config import load_methods, load_models, lookup
    from harness.methods import make_sampler
    from harness.models import resolve_device

    model_spec = lookup(load_models(models_file), model_id, models_file, "model")
    method_spec = lookup(load_methods(methods_file), method_id, methods_file, "method")
    sampler = make_sampler(method_spec)
    sampler.check_nfe(nfe)
    click.echo(prepared.prepare(sampler, cache_dir, model_id, model_spec, method_id, method_spec, nfe,
                                resolve_device(device)))


@cli.command()
@click.option("--model", "model_id", required=True)
@click.option("--kind", type=click.Choice(["exact", "solver"]), required=True,
              help="exact: DOP853 PF-ODE solution (analytic models); solver: the model's reference method.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@models_file_opt
@methods_file_opt
@cache_opt
@device_opt
def reference(model_id, kind, num_samples, seed, models_file, methods_file, cache_dir, device):
    """Compute (or find cached) the reference solution used by exact_err / mse_ref."""
    from harness import references
    from harness.config import load_methods, load_models, lookup
    from harness.models import resolve_device

    spec = lookup(load_models(models_file), model_id, models_file, "model")
    methods = load_methods(methods_file)
    n = num_samples or spec.get("num_samples", 1000)
    references.load_or_compute(cache_dir, model_id, spec, kind, seed, n, methods, resolve_device(device))
    click.echo(references.reference_path(cache_dir, model_id, spec, kind, seed, n, methods))


@cli.command()
@click.argument("model_id")
@models_file_opt
@cache_opt
def train(model_id, models_file, cache_dir):
    """Train (or find cached) a model the workflow trains (models.yaml `train:`); print its folder.

    Example: stepbench train digits-unet
    """
    from harness.config import load_models, lookup
    from harness.training import train_model

    models = load_models(models_file)
    if "train" not in lookup(models, model_id, models_file, "model"):
        raise StepbenchError(f"{models_file}: model {model_id!r} has no 'train' section: it is loaded, not trained")
    click.echo(train_model(model_id, models, cache_dir))


@cli.command()
@click.option("--model", "model_id", required=True, help="Model id from the models file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Batch of the measured call [default: the model's batch_size].")
@models_file_opt
@cache_opt
@device_opt
def flops(model_id, batch_size, models_file, cache_dir, device):
    """Measure (or find cached) the FLOPs of one call of the model's network at its batch size; print the file.

    Example: stepbench flops --model digits-ideal
    """
    from harness import flops as flop_count
    from harness.config import load_models, lookup
    from harness.models import resolve_device

    spec = lookup(load_models(models_file), model_id, models_file, "model")
    batch = batch_size or spec.get("batch_size", 250)
    flop_count.load_or_measure(cache_dir, model_id, spec, batch, device=resolve_device(device))
    click.echo(flop_count.flops_path(cache_dir, model_id, spec, batch))


@cli.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Report directory.")
@click.option("--grid", "grid_file", type=click.Path(path_type=Path), default=None,
              help="Grid config; cells it names that have no result show as n/a (reason).")
@click.option("--grid-json", default=None, help="The grid itself as JSON (the workflow's way); kept as OUT/grid.json.")
@models_file_opt
@methods_file_opt
def report(results_dir, out, grid_file, grid_json, models_file, methods_file):
    """Render RESULTS_DIR's cells into OUT/index.html and OUT/results.csv."""
    from harness.files import write_text
    from harness.report import render_report

    if grid_json is not None:
        if grid_file is not None:
            raise click.UsageError("give --grid or --grid-json, not both")
        grid_file = out / "grid.json"
        write_text(grid_file, grid_json)
    render_report(results_dir, out, grid_file, models_file, methods_file)
    click.echo(f"report -> {out / 'index.html'}")


@cli.command()
@click.option("--nfe", type=click.IntRange(min=1), default=None, help="Also say whether each method meets this budget.")
@methods_file_opt
def methods(nfe, methods_file):
    """List the accelerators of the methods file: solver, NFE rule, side data, schedule, params.

    Example: stepbench methods --nfe 8
    """
    from harness.config import load_methods
    from harness.errors import UnsupportedNFE
    from harness.methods import make_sampler

    rows = []
    table = load_methods(methods_file)
    for method_id, spec in table.items():
        row = {"method": method_id}
        if method_id in table.unusable:  # a plugin module that does not import: listed, with the reason
            if nfe is not None:
                row[f"NFE {nfe}"] = "n/a (its module does not import)"
            rows.append({**row, "family": spec["family"], "unusable": table.unusable[method_id]})
            continue
        sampler = make_sampler(spec)
        if nfe is not None:
            try:
                sampler.check_nfe(nfe)
                row[f"NFE {nfe}"] = "yes"
            except UnsupportedNFE as err:
                row[f"NFE {nfe}"] = f"n/a ({err.reason})"
        rows.append({**row, **sampler.summary()})
    columns = list(dict.fromkeys(key for row in rows for key in row))
    widths = {c: max(len(c), *(len(row.get(c, "")) for row in rows)) for c in columns}
    for row in [dict(zip(columns, columns)), *rows]:
        click.echo("  ".join(row.get(c, "").ljust(widths[c]) for c in columns).rstrip())


@cli.command()
@click.argument("name")
@cache_opt
def extractor(name, cache_dir):
    """Build (train or find cached) the weights of feature extractor NAME; print their path.

    Example: stepbench extractor digits-cnn
    """
    from harness.metrics.features import build_extractor

    click.echo(build_extractor(name, cache_dir))


@cli.command()
@click.option("--model", "model_id", default=None,
              help="Build the statistics of this model's reference data (any kind: folder, npz, library).")
@click.option("--dataset", default=None, help="Or an embedded dataset (models.yaml key 'dataset') ...")
@click.option("--extractor", "extractor_name", default=None, help="... with this feature extractor.")
@click.option("--for", "statistics", type=click.Choice(["fid", "fd_dinov2"]), default="fid", show_default=True,
              help="With --model: the statistics of its fidelity metrics (fid, kid, ...) or of fd_dinov2.")
@models_file_opt
@cache_opt
@device_opt
def refstats(model_id, dataset, extractor_name, statistics, models_file, cache_dir, device):
    """Compute (or find cached) reference features and statistics for FID/KID (or FD_DINOv2); print their path.

    Examples: stepbench refstats --model digits-ideal;  stepbench refstats --dataset digits --extractor digits-cnn;
    stepbench refstats --model sd15 --for fd_dinov2
    """
    from harness.metrics.fidelity import build_reference_statistics, fidelity_setup
    from harness.models import resolve_device

    device = resolve_device(device)
    if model_id is not None:
        from harness.config import load_models, lookup
        from harness.metrics.fd_dinov2 import check_weights, dinov2_setup

        spec = lookup(load_models(models_file), model_id, models_file, "model")
        if statistics == "fd_dinov2":
            source = dinov2_setup(spec, model_id)
            check_weights(source, model_id)
        else:
            source = fidelity_setup(spec, model_id)
        click.echo(build_reference_statistics(cache_dir, source, device=device))
    elif dataset and extractor_name:
        click.echo(build_reference_statistics(cache_dir, dataset, extractor_name, device=device))
    else:
        raise StepbenchError("stepbench refstats: give --model, or --dataset with --extractor")


@cli.command("run", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                      "help_option_names": []})
@click.argument("snakemake_args", nargs=-1, type=click.UNPROCESSED)
def run_workflow(snakemake_args):
    """`snakemake SNAKEMAKE_ARGS...`, after checking the grid files it is given (--configfile): a missing or
    malformed one is one line here, where Snakemake itself fails with a traceback before the workflow starts.

    Example: stepbench run --cores all --configfile my-grid.yaml
    """
    from harness.grid import load_grid

    for path in configfiles(list(snakemake_args)):
        load_grid(path)  # found, well-formed YAML, no key twice, the grid schema
    snakemake = Path(sys.executable).with_name("snakemake")
    executable = str(snakemake) if snakemake.exists() else "snakemake"
    os.execvp(executable, [executable, *snakemake_args])


def configfiles(args: list[str]) -> list[str]:
    """The values of --configfile/--configfiles in a Snakemake command line (each takes one or more files)."""
    files, taking = [], False
    for arg in args:
        if arg.startswith(("--configfile=", "--configfiles=")):
            files.append(arg.split("=", 1)[1])
            taking = False
        elif arg in ("--configfile", "--configfiles"):
            taking = True
        elif taking and not arg.startswith("-"):
            files.append(arg)
        else:
            taking = False
    return files


def run(argv: list[str]) -> int:
    """Run one stepbench command; its exit status. Bad input is one line on stderr, never a traceback."""
    from harness import accounting

    accounting.reset()
    start = time.perf_counter()
    status = 1  # an exception that escapes (a bug) ends the process with 1, as Python does
    try:
        result = cli.main(args=argv, prog_name="stepbench", standalone_mode=False)
        status = result if isinstance(result, int) else 0  # --help returns 0; commands return None
    except StepbenchError as err:
        click.echo(f"stepbench: error: {err}", err=True)
        status = 2
    except click.exceptions.Abort:
        status = 130
    except click.ClickException as err:  # a bad option value, a missing argument: one line too
        usage = getattr(err, "ctx", None)
        hint = f" (see {usage.command_path} --help)" if usage else ""
        click.echo(f"stepbench: error: {err.format_message()}{hint}", err=True)
        status = err.exit_code
    finally:
        accounting.write_ledger(argv, time.perf_counter() - start, status)
    return status


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
