# One job per supported grid cell, guidance scale and seed: paired noise from (seed, i), audited NFE. A guided
# cell's folder is nfeN-wS (the wildcard `guidance` is "-wS", empty for the conditional model alone).


rule sample:
    input:
        prepared=lambda wc: PLAN.prepared_for(wc.model, wc.method, wc.nfe),
        flops=lambda wc: PLAN.flops_for(wc.model),
        models=lambda wc: PLAN.sample_inputs(wc.model, wc.method),
    output:
        samples=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}{{guidance}}/seed{{seed}}/samples.npz",
        cell=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}{{guidance}}/seed{{seed}}/cell.json",
    params:
        out=lambda wc: PLAN.cell_dir(wc.model, wc.method, wc.nfe, wc.guidance, wc.seed),
        num_samples=lambda wc: PLAN.num_samples[wc.model],
        scale=lambda wc: parse_guidance_suffix(wc.guidance),
        # an edited entry reruns the cell
        config_hash=lambda wc: PLAN.cell_hash(wc.model, wc.method, wc.nfe, wc.guidance, wc.seed),
        common=COMMON,
    wildcard_constraints:
        nfe=r"\d+",
        guidance=GUIDANCE_WILDCARD,
        seed=r"\d+",
    resources:
        gpu=0,  # 1 in the profiles: a job that runs a network gets a GPU of its own
    log:
        f"{RESULTS}/logs/sample/{{model}}__{{method}}__nfe{{nfe}}{{guidance}}__seed{{seed}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job --gpus {resources.gpu} sample --model {wildcards.model:q} --method {wildcards.method:q}"
        " --nfe {wildcards.nfe:q} --guidance {params.scale:q} --out {params.out:q} --num-samples {params.num_samples:q}"
        " --seed {wildcards.seed:q} {params.common} > {log:q} 2>&1"
