# Embedded artifacts trained on CPU and cached: feature extractors for offline metrics.


for _name, _path in PLAN.extractors.items():

    rule:
        name:
            f"extractor_{_name}"
        output:
            _path,
        params:
            name=_name,
            cache=CACHE,
        log:
            f"{RESULTS}/logs/extractor_{_name}.log",
        conda:
            "envs/stepbench.yaml"
        shell:
            "stepbench extractor {params.name} --cache-dir {params.cache} > {log} 2>&1"
