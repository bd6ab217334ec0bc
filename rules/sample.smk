# One job per supported grid cell: paired noise from (seed, i), audited NFE.


rule sample:
    input:
        prepared=lambda wc: PLAN.prepared_for(wc.model, wc.method, wc.nfe),
    output:
        samples=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}/samples.npz",
        cell=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}/cell.json",
    params:
        out=lambda wc: PLAN.cell_dir(wc.model, wc.method, wc.nfe),
        num_samples=lambda wc: PLAN.num_samples[wc.model],
        seed=PLAN.seed,
        common=COMMON,
    wildcard_constraints:
        nfe=r"\d+",
    log:
        f"{RESULTS}/logs/sample/{{model}}__{{method}}__nfe{{nfe}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench sample --model {wildcards.model} --method {wildcards.method} --nfe {wildcards.nfe}"
        " --out {params.out} --num-samples {params.num_samples} --seed {params.seed} {params.common} > {log} 2>&1"
