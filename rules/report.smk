# The leaderboard: every requested cell, unsupported ones as "n/a (reason)".

import os


rule report:
    input:
        metrics=[cell_dir / "metrics.json" for cell_dir in PLAN.cell_dirs()],
    output:
        html=f"{config['reports_dir']}/index.html",
        csv=f"{config['reports_dir']}/results.csv",
    params:
        results=RESULTS,
        out=lambda wildcards, output: os.path.dirname(output.html),
        files=PLAN.config_file_args,
        # the effective grid (config files and --config merged) as a param: a changed grid reruns the report,
        # with no job of its own (a `run:` rule cost a Snakefile re-parse, ~30 s)
        grid=json.dumps(dict(config), sort_keys=True),
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job report {params.results:q} --out {params.out:q} --grid-json {params.grid:q} {params.files} > {log:q} 2>&1"
