# stepbench: the grid model x method x NFE -> samples -> metrics -> leaderboard.
# All logic lives in the `harness` package; rules only call the `stepbench` CLI.
#   snakemake --cores all                              # default embedded grid (profiles/default)
#   snakemake --cores all --configfile my-grid.yaml    # another grid (keys: harness/schemas/grid.schema.yaml)

import json
import os
import sys

import yaml

from snakemake.utils import min_version, validate

from harness.config import load_yaml
from harness.errors import StepbenchError
from harness.grid import check_grid
from harness.grid import parse_guidance_suffix
from harness.workflow import failed_job_lines, forget_run, plan, record_run, stale_lock_line

min_version("8.0")


# A grid given with --configfile replaces the default grid (Snakemake would merge the two, so the default's
# blocks would run too); --config key=value alone changes keys of the default grid.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "profiles/default/grid.yaml")


# Snakemake reads --config nfe=[6,8] as the strings '6', '8' (scalars it types): read each value as YAML, as
# a grid file's would be
for _arg in workflow.config_settings.config_args or []:
    _key, _, _value = _arg.partition("=")
    if _key in config and "." not in _key:
        try:
            config[_key] = yaml.safe_load(_value)
        except yaml.YAMLError:
            pass  # keep Snakemake's reading; the schema check below names the key

try:
    # our check first: one line naming the file and key, where Snakemake's validate prints the schema
    for _file in workflow.overwrite_configfiles:  # Snakemake's reading lets a key given twice win silently
        load_yaml(_file)
    grid_source = ", ".join(map(str, workflow.overwrite_configfiles)) or "profiles/default/grid.yaml"
    check_grid(config, grid_source + (" with --config" if workflow.config_settings.config_args else ""))
    validate(config, "harness/schemas/grid.schema.yaml")  # fills the schema's defaults
    PLAN = plan(config)
except StepbenchError as err:  # bad config: one line, no traceback
    sys.exit(f"stepbench: error: {err}")

if workflow.is_main_process:  # not again in each cluster job: the submitting process checked
    for _line in PLAN.set_aside_damaged_cells([f"{config['reports_dir']}/{name}" for name in ("index.html", "results.csv")]):  # damaged cells and stale metrics are recomputed, never reported
        print(_line, file=sys.stderr)

RESULTS = PLAN.results_dir
GUIDANCE_WILDCARD = r"(|-w[0-9]+(\.[0-9]+)?)"  # a cell folder's guidance suffix (harness.grid.guidance_suffix)
CACHE = PLAN.cache_dir
COMMON = PLAN.untracked_common_args  # --models-file/--methods-file/--cache-dir for cell-level CLI calls


# A run killed outright leaves Snakemake's lock: say so in one line, with what to do (not under --unlock itself)
if workflow.is_main_process and "--unlock" not in sys.argv and (_stale := stale_lock_line()):
    sys.exit(_stale)


onstart:
    record_run()


onsuccess:
    forget_run()


onerror:
    forget_run()
    # each failed job's own one-line error, after Snakemake's report (which only points to the job's log)
    for _line in failed_job_lines(log):
        print(_line, file=sys.stderr)


# Bookkeeping that costs nothing stays on the submitting node under a cluster executor.
localrules:
    all,


include: "rules/zoo.smk"
include: "rules/train.smk"
include: "rules/reference.smk"
include: "rules/prepare.smk"
include: "rules/sample.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        f"{config['reports_dir']}/index.html",
        f"{config['reports_dir']}/results.csv",
