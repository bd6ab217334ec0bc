# Embedded artifacts trained on CPU and cached: feature extractors for offline metrics.


for _name, _path in PLAN.extractors.items():

    rule:
        name:
            f"extractor_{_name}"
        output:
            _path,
        params:
            name=_name,
        log:
            f"{RESULTS}/logs/extractor_{_name}.log",
        shell:
            "stepbench extractor {params.name} --cache-dir {CACHE} > {log} 2>&1"
