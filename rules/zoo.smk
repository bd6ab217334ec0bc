# Embedded artifacts trained on CPU and cached: feature extractors for offline metrics.


rule extractor:
    priority: 10
    output:
        f"{CACHE}/extractors/{{name}}.pt",
    params:
        cache=CACHE,
    wildcard_constraints:
        name="|".join(PLAN.extractors) or "(none)",
    resources:
        gpu=0,  # 1 in the profiles: a job that runs a network gets a GPU of its own
    log:
        f"{RESULTS}/logs/extractor_{{name}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job --gpus {resources.gpu} extractor {wildcards.name:q} --cache-dir {params.cache:q} > {log:q} 2>&1"
