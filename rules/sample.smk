# One job per supported grid cell and seed: paired noise from (seed, i), audited NFE.


rule sample:
    input:
        prepared=lambda wc: PLAN.prepared_for(wc.model, wc.method, wc.nfe),
        flops=lambda wc: PLAN.flops_for(wc.model),
        models=lambda wc: PLAN.sample_inputs(wc.model, wc.method),
    output:
        samples=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}/seed{{seed}}/samples.npz",
        cell=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}/seed{{seed}}/cell.json",
    params:
        out=lambda wc: PLAN.cell_dir(wc.model, wc.method, wc.nfe, wc.seed),
        num_samples=lambda wc: PLAN.num_samples[wc.model],
        config_hash=lambda wc: PLAN.cell_hash(wc.model, wc.method, wc.nfe, wc.seed),  # an edited entry reruns
        common=COMMON,
    wildcard_constraints:
        nfe=r"\d+",
        seed=r"\d+",
    resources:
        gpu=0,  # 1 in the profiles: a job that runs a network gets a GPU of its own
    log:
        f"{RESULTS}/logs/sample/{{model}}__{{method}}__nfe{{nfe}}__seed{{seed}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job --gpus {resources.gpu} sample --model {wildcards.model:q} --method {wildcards.method:q}"
        " --nfe {wildcards.nfe:q} --out {params.out:q} --num-samples {params.num_samples:q} --seed {wildcards.seed:q}"
        " {params.common} > {log:q} 2>&1"
