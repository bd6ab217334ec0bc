# Metrics of one cell; the cached reference work it needs is built by rules/reference.smk first.


rule evaluate:
    input:
        cell=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}/cell.json",
        samples=f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}/samples.npz",
        cached=lambda wc: PLAN.eval_inputs[wc.model],
    output:
        f"{RESULTS}/cells/{{model}}/{{method}}/nfe{{nfe}}/metrics.json",
    params:
        out=lambda wc: PLAN.cell_dir(wc.model, wc.method, wc.nfe),
        common=COMMON,
    wildcard_constraints:
        nfe=r"\d+",
    log:
        f"{RESULTS}/logs/evaluate/{{model}}__{{method}}__nfe{{nfe}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench evaluate {params.out} {params.common} > {log} 2>&1"
