# Prepared artifacts: a method's side data (statistics, fitted ratios, searched schedules), one job
# per (model, method[, NFE]), cached; sampling jobs only load them.


for _path, (_model, _method, _nfe) in PLAN.prepare_jobs().items():

    rule:
        name:
            f"prepare_{_model}_{_method}_{_nfe}".replace("-", "_").replace(".", "_")
        output:
            _path,
        params:
            model=_model,
            method=_method,
            nfe=_nfe,
            common=COMMON,
        log:
            f"{RESULTS}/logs/prepare/{_model}__{_method}__nfe{_nfe}.log",
        conda:
            "envs/stepbench.yaml"
        shell:
            "stepbench prepare --model {params.model} --method {params.method} --nfe {params.nfe}"
            " {params.common} > {log} 2>&1"
