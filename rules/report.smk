# The leaderboard: every requested cell, unsupported ones as "n/a (reason)".

import os


rule grid_config:
    # The effective grid (config files and --config overrides merged) for the report; a change of
    # params makes Snakemake rewrite it.
    output:
        f"{RESULTS}/grid.json",
    params:
        grid=dict(config),
    log:
        f"{RESULTS}/logs/grid_config.log",
    run:
        import json

        from harness.files import write_text

        write_text(output[0], json.dumps(params.grid, indent=2, sort_keys=True))


rule report:
    input:
        metrics=[cell_dir / "metrics.json" for cell_dir in PLAN.cell_dirs()],
        grid=f"{RESULTS}/grid.json",
    output:
        html=f"{config['reports_dir']}/index.html",
        csv=f"{config['reports_dir']}/results.csv",
    params:
        results=RESULTS,
        out=lambda wildcards, output: os.path.dirname(output.html),
        files=PLAN.config_file_args,
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job report {params.results:q} --out {params.out:q} --grid {input.grid:q} {params.files} > {log:q} 2>&1"
