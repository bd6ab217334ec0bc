# The leaderboard: every requested cell, unsupported ones as "n/a (reason)".


rule grid_config:
    # The effective grid (config files and --config overrides merged) for the report; params
    # changes make Snakemake rewrite it.
    output:
        f"{RESULTS}/grid.json",
    params:
        grid=dict(config),
    run:
        import json

        with open(output[0], "w") as fh:
            json.dump(params.grid, fh, indent=2, sort_keys=True)


rule report:
    input:
        metrics=[PLAN.cell_dir(c.model, c.method, c.nfe) / "metrics.json" for c in PLAN.cells],
        grid=f"{RESULTS}/grid.json",
    output:
        html=f"{config['reports_dir']}/index.html",
        csv=f"{config['reports_dir']}/results.csv",
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "stepbench report {RESULTS} --out {config[reports_dir]} --grid {input.grid} {COMMON} > {log} 2>&1"
