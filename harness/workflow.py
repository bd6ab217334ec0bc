"""What the Snakefile needs to know: cells to run and the cached artifacts each evaluation needs.

The Snakefile stays thin: it asks `plan(config)` for concrete paths, so a cached file's name is
computed in one place (the harness) for both the workflow and a standalone `stepbench evaluate`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
import re
import socket
from shlex import quote  # paths from the grid reach the jobs' shell commands: quoted, so they stay paths
from dataclasses import dataclass, field
from pathlib import Path

from harness import integrity, prepared, references
from harness.cells import cell_config_hash
from harness.config import config_hash, load_methods, load_models
from harness.grid import GridCell, expand_grid, grid_seeds, parse_guidance_suffix
from harness.errors import ConfigError, StepbenchError, valid_names
from harness.flops import flops_path
from harness.training import MARKER, trained_folder
from harness.methods import make_sampler
from harness.models import check_model

# metric -> reference solution kind it reads
REFERENCE_KIND = {"exact_err": "exact", "mse_ref": "solver"}
FIDELITY_METRICS = {"fid", "kid", "is", "prc", "precision", "recall", "class_acc"}


@dataclass
class Plan:
    results_dir: Path
    cache_dir: Path
    models_file: str
    methods_file: str
    seeds: list[int]  # every supported cell runs once per seed
    cells: list[GridCell]  # supported cells only
    num_samples: dict[str, int]  # per model
    references: dict[tuple[str, str, int], Path] = field(default_factory=dict)  # (model, kind, seed) -> file
    extractors: dict[str, Path] = field(default_factory=dict)  # name -> weights file
    # statistics file -> (a model whose reference it is, the built extractor it needs, if any, 'fid' | 'fd_dinov2')
    refstats: dict[Path, tuple[str, list[Path], str]] = field(default_factory=dict)
    eval_inputs: dict[tuple[str, int], list[Path]] = field(default_factory=dict)  # (model, seed) -> cached files
    prepared: dict[tuple[str, str, int], Path] = field(default_factory=dict)  # cell -> its method's side data
    flops: dict[Path, tuple[str, int]] = field(default_factory=dict)  # FLOP count file -> (model, batch size)
    trained: dict[Path, str] = field(default_factory=dict)  # a trained model's marker file -> model id
    # (model, method) -> what a cell needs of the other models its method runs (their weights, FLOP counts)
    extra_inputs: dict[tuple[str, str], list[Path]] = field(default_factory=dict)
    all_models: dict[str, dict] = field(default_factory=dict)  # models.yaml (trained models need their teachers)
    model_specs: dict[str, dict] = field(default_factory=dict)  # the grid's models, as models.yaml has them
    method_specs: dict[str, dict] = field(default_factory=dict)  # the grid's methods, as methods.yaml has them

    def prepared_for(self, model: str, method: str, nfe) -> list[Path]:
        path = self.prepared.get((model, method, int(nfe)))
        return [path] if path else []

    def prepare_jobs(self) -> dict[Path, tuple[str, str, int]]:
        """One job per distinct artifact (a per-model artifact serves every NFE)."""
        jobs: dict[Path, tuple[str, str, int]] = {}
        for cell, path in self.prepared.items():
            jobs.setdefault(path, cell)
        return jobs

    # The rules for cached files match them by path; what makes each is looked up here.
    def prepare_job(self, path) -> tuple[str, str, int]:
        """(model, method, NFE) whose preparation writes `path`."""
        return _planned(self.prepare_jobs(), path, "prepared artifact")

    def refstats_job(self, path) -> tuple[str, list[Path], str]:
        """(a model whose reference data it describes, the built extractor weights it needs, whose statistics:
        'fid' for the model's fidelity metrics, 'fd_dinov2' for its DINOv2 ones)."""
        return _planned(self.refstats, path, "reference statistics file")

    def reference_job(self, path) -> tuple[str, str, int]:
        """(model, kind, seed) of a reference solution file."""
        return _planned({file: key for key, file in self.references.items()}, path, "reference solution")

    def model_inputs(self, model: str) -> list[Path]:
        """Files a job that loads `model` needs first: its trained weights, for a model the workflow trains."""
        spec = self.all_models.get(model, {})
        return [trained_folder(self.cache_dir, spec) / MARKER] if "train" in spec else []

    def sample_inputs(self, model: str, method: str) -> list[Path]:
        """What a sampling job loads: its model, and the models its method runs beside it."""
        return self.model_inputs(model) + self.extra_inputs.get((model, method), [])

    def train_job(self, path) -> str:
        return _planned(self.trained, path, "trained model")

    def train_inputs(self, path) -> list[Path]:
        """A student's training needs its teacher trained."""
        teacher = self.all_models[self.train_job(path)]["train"].get("teacher")
        return self.model_inputs(teacher) if teacher else []

    def flops_job(self, path) -> tuple[str, int]:
        """(model, batch size) whose FLOPs per call a file holds."""
        return _planned(self.flops, path, "FLOP count")

    def flops_for(self, model: str) -> Path:
        return next(path for path, (m, _) in self.flops.items() if m == model)

    def untracked_model_args(self, wildcards, output) -> str:
        """--models-file and --cache-dir for the per-model jobs (refstats, flops), untracked as `untracked_common_args` is."""
        return f"--models-file {quote(str(self.models_file))} --cache-dir {quote(str(self.cache_dir))}"

    @property
    def config_file_args(self) -> str:
        return f"--models-file {quote(str(self.models_file))} --methods-file {quote(str(self.methods_file))}"

    @property
    def common_args(self) -> str:
        """Options every cell-level CLI call takes: the config files and the cache."""
        return f"{self.config_file_args} --cache-dir {quote(str(self.cache_dir))}"

    def untracked_common_args(self, wildcards, output) -> str:
        """`common_args` as a Snakemake param function of the output, which Snakemake does not compare
        between runs: what the files say is tracked instead (cached files are named by their content; cells
        and metrics carry their entries' hashes as params), so a grid pointed at a copy of methods.yaml
        elsewhere reruns nothing."""
        return self.common_args

    def cell_dir(self, model: str, method: str, nfe, guidance: str, seed) -> Path:
        """guidance: the folder's suffix ('' or '-w4', the rules' wildcard)."""
        return GridCell(model, method, int(nfe), True, guidance=parse_guidance_suffix(guidance)).path(
            self.results_dir, int(seed))

    def cell_hash(self, model: str, method: str, nfe, guidance: str, seed) -> str:
        """cell.json's config_hash: a rule param, so that editing the model's or the method's entry reruns
        the cell (Snakemake reruns a job whose params changed)."""
        return cell_config_hash(self.model_specs[model], self.method_specs[method], int(nfe), int(seed),
                                self.num_samples[model], parse_guidance_suffix(guidance))

    def twin_inputs(self, model: str, method: str, nfe, guidance: str, seed) -> list[Path]:
        """What a quantised cell's evaluation reads of its full-precision twin (mse_fp32); nothing for others."""
        base = twin_method(self.method_specs[method])
        if base is None:
            return []
        folder = self.cell_dir(model, base, nfe, guidance, seed)
        return [folder / "cell.json", folder / "samples.npz"]

    def model_hash(self, model: str) -> str:
        """The model entry's hash: a param of the jobs its metrics settings (references, metrics) feed."""
        return config_hash(self.model_specs[model])

    def cell_dirs(self) -> list[Path]:
        return [c.path(self.results_dir, seed) for c in self.cells for seed in self.seeds]

    def set_aside_damaged_cells(self, report_files: list[str]) -> list[str]:
        """Check every planned cell that exists (harness.integrity) and move the files of a damaged one, or the
        stale metrics of an intact one, to RESULTS/damaged/, and with them the report that shows their numbers:
        Snakemake recomputes what is missing downstream of a target it must remake (a missing input of a job whose
        outputs are present does not count: it could be a temp file). Returns one line per cell."""
        memory = self.cache_dir / "integrity-hashes.json"
        integrity.load_hash_memory(memory)
        lines = []
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for cell_dir in self.cell_dirs():
            damage = integrity.cell_damage(cell_dir)
            stale = integrity.metrics_staleness(cell_dir) if damage is None else None
            if damage is None and stale is None:
                continue
            files = ("cell.json", "samples.npz", "metrics.json") if damage is not None else ("metrics.json",)
            for name in files:
                if (cell_dir / name).exists():
                    integrity.set_aside(cell_dir / name, self.results_dir, stamp)
            what = "sampled and evaluated" if damage is not None else "evaluated"
            lines.append(f"stepbench: cell {cell_dir}: {damage or stale[1]}; it will be {what} again "
                         f"(the old files are in {self.results_dir / 'damaged' / stamp})")
        if lines:  # the report shows those cells' old numbers
            for name in report_files:
                if Path(name).exists():
                    target = self.results_dir / "damaged" / stamp / "report" / Path(name).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(name, target)
        if self.cache_dir.is_dir():
            integrity.save_hash_memory(memory)
        return lines


def plan(config: dict) -> Plan:
    models = load_models(config["models_file"])
    methods = load_methods(config["methods_file"])
    results_dir = Path(config["results_dir"])
    cache_dir = results_dir / "cache"
    seeds = grid_seeds(config)
    cells = with_twins([c for c in expand_grid(config, models, methods) if c.supported], methods)
    model_ids = list(dict.fromkeys(c.model for c in cells))
    for model_id in model_ids:  # a missing checkpoint is one line now, not a failed job later
        try:
            check_model(models[model_id])
        except StepbenchError as err:
            raise ConfigError(f"{config['models_file']}: model {model_id!r}: {err}") from None
    result = Plan(
        results_dir=results_dir,
        cache_dir=cache_dir,
        models_file=config["models_file"],
        methods_file=config["methods_file"],
        seeds=seeds,
        cells=cells,
        num_samples={m: config.get("num_samples") or models[m].get("num_samples", 1000) for m in model_ids},
        model_specs={m: models[m] for m in model_ids},
        method_specs={m: methods[m] for m in dict.fromkeys(c.method for c in cells)},
        all_models=models,
    )
    extra_ids = []
    for cell in cells:  # models a method runs beside the cell's (stitch): trained, their FLOPs counted
        for other in make_sampler(methods[cell.method]).extra_models():
            if other not in models:
                raise ConfigError(f"{config['methods_file']}: method {cell.method!r} runs model {other!r}, which is "
                                  f"not in {config['models_file']}{valid_names(other, models)}")
            if models[other]["process"] != models[cell.model]["process"]:
                raise ConfigError(f"{config['methods_file']}: method {cell.method!r} runs {other!r} beside "
                                  f"{cell.model!r}, whose noise process differs")
            for key in ("classes", "prompts"):  # the small network runs on the large model's conditions
                if models[other].get(key) != models[cell.model].get(key):
                    raise ConfigError(f"{config['methods_file']}: method {cell.method!r} runs {other!r} beside "
                                      f"{cell.model!r}, whose {key} differ")
            batch = min(models[cell.model].get("batch_size", 250), result.num_samples[cell.model])
            path = flops_path(cache_dir, other, models[other], batch)
            result.flops[path] = (other, batch)
            result.extra_inputs.setdefault((cell.model, cell.method), []).append(path)
            extra_ids.append(other)
    for model_id in _with_teachers([*model_ids, *extra_ids], models):
        if "train" in models[model_id]:
            result.trained[trained_folder(cache_dir, models[model_id]) / MARKER] = model_id
    for (model_id, method_id), paths in result.extra_inputs.items():
        for other in make_sampler(methods[method_id]).extra_models():
            paths += result.model_inputs(other)
    for cell in cells:
        sampler = make_sampler(methods[cell.method])
        path = prepared.artifact_path(cache_dir, cell.model, models[cell.model], cell.method, methods[cell.method],
                                      sampler, cell.nfe)
        if path is not None:
            result.prepared[(cell.model, cell.method, cell.nfe)] = path
    for model_id in model_ids:
        spec = models[model_id]
        batch = min(spec.get("batch_size", 250), result.num_samples[model_id])  # as harness.cells runs it
        result.flops[flops_path(cache_dir, model_id, spec, batch)] = (model_id, batch)
        shared: list[Path] = []  # the same for every seed
        for metric in spec["metrics"]:
            if metric in FIDELITY_METRICS:
                shared += _fidelity_inputs(result, cache_dir, model_id, spec)
            if metric == "fd_dinov2":
                shared += _dinov2_inputs(result, cache_dir, model_id, spec)
        for seed in seeds:
            needs = list(shared)
            for metric in spec["metrics"]:
                if metric in REFERENCE_KIND:
                    kind = REFERENCE_KIND[metric]
                    path = references.reference_path(cache_dir, model_id, spec, kind, seed,
                                                     result.num_samples[model_id], methods)
                    result.references[(model_id, kind, seed)] = path
                    needs.append(path)
            result.eval_inputs[(model_id, seed)] = sorted(set(needs))
    return result


def twin_method(method_spec: dict) -> str | None:
    """The base solver a quantised method is measured against (mse_fp32), None for other families."""
    return method_spec["quantized"]["base"] if method_spec.get("family") == "quantized" else None


def with_twins(cells: list[GridCell], methods: dict) -> list[GridCell]:
    """The cells and, for each quantised one, its full-precision twin (the base solver at the same model, NFE and
    guidance) when the grid does not list it: mse_fp32 reads its samples."""
    have = {c.key for c in cells}
    out = list(cells)
    for cell in cells:
        base = twin_method(methods[cell.method])
        if base is not None and (cell.model, base, cell.nfe, cell.guidance) not in have:
            twin = GridCell(cell.model, base, cell.nfe, True, guidance=cell.guidance)
            have.add(twin.key)
            out.append(twin)
    return out


def _with_teachers(model_ids, models: dict) -> list[str]:
    """The models and, recursively, the teachers their training distils."""
    found, todo = [], list(model_ids)
    while todo:
        model_id = todo.pop(0)
        if model_id not in found:
            found.append(model_id)
            teacher = models[model_id].get("train", {}).get("teacher")
            if teacher:
                todo.append(teacher)
    return found


def _planned(table: dict, path, what: str):
    found = table.get(Path(path))
    if found is None:
        raise StepbenchError(f"{path}: no {what} of this name in the grid's plan (a file from another grid?)")
    return found


def _fidelity_inputs(result: Plan, cache_dir: Path, model_id: str, spec: dict) -> list[Path]:
    """Cached files a model's fidelity metrics read. Reference statistics get a job of their own
    (stepbench refstats --model), and so do embedded extractors (stepbench extractor); a library's or
    a configured weights file is a plain input: Snakemake says it is missing, nothing downloads it."""
    from harness.metrics.features import get_extractor
    from harness.metrics.fidelity import fidelity_setup, planned_weights, reference_statistics_path

    setup = fidelity_setup(spec, model_id)
    weights = planned_weights(setup, cache_dir)
    buildable = (setup.backend == "torch-fidelity" and setup.weights_config is None
                 and get_extractor(setup.extractor).build is not None)
    if buildable:
        result.extractors[setup.extractor] = weights
    stats = reference_statistics_path(cache_dir, setup)
    result.refstats.setdefault(stats, (model_id, [weights] if buildable else [], "fid"))
    return [weights, stats]


def _dinov2_inputs(result: Plan, cache_dir: Path, model_id: str, spec: dict) -> list[Path]:
    """fd_dinov2's weights file (a plain input, checked here: a missing one is one line saying what to download)
    and its reference statistics, made by a refstats job of their own."""
    from harness.metrics.fd_dinov2 import check_weights, dinov2_setup
    from harness.metrics.fidelity import reference_statistics_path

    setup = dinov2_setup(spec, model_id)
    weights = check_weights(setup, model_id)
    stats = reference_statistics_path(cache_dir, setup)
    result.refstats.setdefault(stats, (model_id, [], "fd_dinov2"))
    return [weights, stats]


def failed_job_lines(snakemake_logs: str | list[str]) -> list[str]:
    """One line per failed job of a run, read from Snakemake's log(s) of it: the job's own last line (its
    one-line error, or a traceback's last line) and its log file. Printed last, the cause ends the output
    instead of waiting in a file that Snakemake's error block points to."""
    lines = []
    snakemake_logs = [snakemake_logs] if isinstance(snakemake_logs, str) else snakemake_logs
    text = "".join(Path(p).read_text() for p in snakemake_logs if Path(p).is_file())
    for log in dict.fromkeys(re.findall(r"^\s*log: (\S+) \(check log file", text, re.M)):
        job_lines = Path(log).read_text().splitlines() if Path(log).is_file() else []
        last = next((line for line in reversed(job_lines) if line.strip()), "(its log is empty)")
        lines.append(f"stepbench: error: a job failed ({log}): {last.removeprefix('stepbench: error: ')}")
    return lines


# --- a run killed outright (SIGKILL, a lost node) leaves Snakemake's lock behind ---------------------

RUN_RECORD = Path(".snakemake") / "stepbench-run.json"
LOCKS = Path(".snakemake") / "locks"


def record_run() -> None:
    """Called when a run starts (Snakemake's onstart, after it took its lock): which process holds the lock."""
    RUN_RECORD.parent.mkdir(parents=True, exist_ok=True)
    RUN_RECORD.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def forget_run() -> None:
    """Called when a run ends by itself (onsuccess, onerror): Snakemake released its lock."""
    RUN_RECORD.unlink(missing_ok=True)


def stale_lock_line() -> str | None:
    """One line saying what to do when the working directory is locked by a run whose process is gone."""
    if not LOCKS.is_dir() or not any(LOCKS.iterdir()) or not RUN_RECORD.is_file():
        return None
    try:
        holder = json.loads(RUN_RECORD.read_text())
        pid, host = int(holder["pid"]), holder["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname() or _alive(pid):
        return None  # another machine's run, or one still going: Snakemake's own lock message applies
    return (f"stepbench: error: a run in this directory (pid {pid}) was killed and left Snakemake's lock; "
            "run `snakemake --unlock`, then the same command again (finished cells are kept)")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
