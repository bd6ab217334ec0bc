# Metrics of one cell; the cached reference work it needs is built by rules/reference.smk first.


rule evaluate:
    input:
        cell=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}{{guidance}}/seed{{seed}}/cell.json",
        samples=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}{{guidance}}/seed{{seed}}/samples.npz",
        cached=lambda wc: PLAN.eval_inputs[(wc.model, int(wc.seed))],
        twin=lambda wc: PLAN.twin_inputs(wc.model, wc.method, wc.nfe, wc.guidance, wc.seed),  # quantised cells' fp32 twin
    output:
        f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}{{guidance}}/seed{{seed}}/metrics.json",
    params:
        out=lambda wc: PLAN.cell_dir(wc.model, wc.method, wc.nfe, wc.guidance, wc.seed),
        model_hash=lambda wc: PLAN.model_hash(wc.model),  # edited metric settings rerun the metrics
        common=COMMON,
    wildcard_constraints:
        nfe=r"\d+",
        guidance=GUIDANCE_WILDCARD,
        seed=r"\d+",
    resources:
        gpu=0,  # 1 in the profiles: a job that runs a network gets a GPU of its own
    log:
        f"{RESULTS}/logs/evaluate/{{model}}__{{method}}__nfe{{nfe}}{{guidance}}__seed{{seed}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job --gpus {resources.gpu} evaluate {params.out:q} {params.common} > {log:q} 2>&1"
