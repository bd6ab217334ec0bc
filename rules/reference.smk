# Cached reference work: dataset statistics per (dataset, extractor) and reference solutions per
# (model, seeds) for exact_err / mse_ref. Paths come from the harness, so `stepbench evaluate`
# outside the workflow finds the same files.


for _path, (_model, _extractor_weights) in PLAN.refstats.items():

    rule:
        name:
            f"refstats_{_path.stem}".replace("-", "_").replace(".", "_")
        input:
            _extractor_weights,
        output:
            _path,
        params:
            model=_model,
            models_file=PLAN.models_file,
            cache=CACHE,
        log:
            f"{RESULTS}/logs/refstats_{_path.stem}.log",
        conda:
            "envs/stepbench.yaml"
        shell:
            "stepbench refstats --model {params.model} --models-file {params.models_file} --cache-dir {params.cache}"
            " > {log} 2>&1"


for (_model, _kind, _seed), _path in PLAN.references.items():

    rule:
        name:
            f"reference_{_kind}_{_model}_seed{_seed}".replace("-", "_")
        output:
            _path,
        params:
            model=_model,
            kind=_kind,
            num_samples=PLAN.num_samples[_model],
            seed=_seed,
            common=COMMON,
        log:
            f"{RESULTS}/logs/reference_{_kind}_{_model}_seed{_seed}.log",
        conda:
            "envs/stepbench.yaml"
        shell:
            "stepbench reference --model {params.model} --kind {params.kind}"
            " --num-samples {params.num_samples} --seed {params.seed} {params.common} > {log} 2>&1"
