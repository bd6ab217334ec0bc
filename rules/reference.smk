# Cached reference work: dataset statistics per (dataset, extractor) and reference solutions per
# (model, seeds) for exact_err / mse_ref. Paths come from the harness, so `stepbench evaluate`
# outside the workflow finds the same files; the plan says what makes each. Cached work runs first
# (priority): cells' metrics wait for it, and a long reference solution should not start last.


rule refstats:
    priority: 10
    input:
        lambda wc: PLAN.refstats_job(f"{CACHE}/refstats/{wc.name}.npz")[1],  # a built extractor's weights
    output:
        f"{CACHE}/refstats/{{name}}.npz",
    params:
        model=lambda wc, output: PLAN.refstats_job(output[0])[0],
        statistics=lambda wc, output: PLAN.refstats_job(output[0])[2],
        files=PLAN.untracked_model_args,
    wildcard_constraints:
        name=r"[^/]+",
    resources:
        gpu=0,  # 1 in the profiles: a job that runs a network gets a GPU of its own
    log:
        f"{RESULTS}/logs/refstats/{{name}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job --gpus {resources.gpu} refstats --model {params.model:q} --for {params.statistics}"
        " {params.files}"
        " > {log:q} 2>&1"


rule reference:
    priority: 10
    input:
        lambda wc: PLAN.model_inputs(wc.model),
    output:
        f"{CACHE}/references/{{model}}/{{kind}}-{{key}}.npz",
    params:
        seed=lambda wc, output: PLAN.reference_job(output[0])[2],
        num_samples=lambda wc: PLAN.num_samples[wc.model],
        common=COMMON,
    wildcard_constraints:
        model=r"[^/]+",
        kind=r"exact|solver",
        key=r"[0-9a-f]+",
    resources:
        gpu=0,  # 1 in the profiles: a job that runs a network gets a GPU of its own
    log:
        f"{RESULTS}/logs/reference/{{model}}__{{kind}}-{{key}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job --gpus {resources.gpu} reference --model {wildcards.model:q} --kind {wildcards.kind:q}"
        " --num-samples {params.num_samples:q} --seed {params.seed:q} {params.common} > {log:q} 2>&1"


rule flops:
    priority: 10
    input:
        lambda wc: PLAN.model_inputs(PLAN.flops_job(f"{CACHE}/flops/{wc.name}.json")[0]),
    output:
        f"{CACHE}/flops/{{name}}.json",
    params:
        model=lambda wc, output: PLAN.flops_job(output[0])[0],
        batch=lambda wc, output: PLAN.flops_job(output[0])[1],
        files=PLAN.untracked_model_args,
    wildcard_constraints:
        name=r"[^/]+",
    resources:
        gpu=0,  # 1 in the profiles: a job that runs a network gets a GPU of its own
    log:
        f"{RESULTS}/logs/flops/{{name}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job --gpus {resources.gpu} flops --model {params.model:q} --batch-size {params.batch:q}"
        " {params.files} > {log:q} 2>&1"
