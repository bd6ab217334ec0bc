# Prepared artifacts: a method's side data (statistics, fitted ratios, searched schedules), one job
# per (model, method[, NFE]), cached; sampling jobs only load them. The file names are content keys the
# harness computes (harness.prepared.artifact_path); the plan says which (model, method, NFE) makes each.


rule prepare:
    priority: 10
    input:
        lambda wc: PLAN.model_inputs(wc.model),
    output:
        f"{CACHE}/prepared/{{model}}/{{artifact}}.safetensors",
    params:
        method=lambda wc, output: PLAN.prepare_job(output[0])[1],
        nfe=lambda wc, output: PLAN.prepare_job(output[0])[2],
        common=COMMON,
    wildcard_constraints:
        model=r"[^/]+",
        artifact=r"[^/]+",
    resources:
        gpu=0,  # 1 in the profiles: a job that runs a network gets a GPU of its own
    log:
        f"{RESULTS}/logs/prepare/{{model}}__{{artifact}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job --gpus {resources.gpu} prepare --model {wildcards.model:q} --method {params.method:q}"
        " --nfe {params.nfe:q} {params.common} > {log:q} 2>&1"
