# The embedded zoo's neural models, trained by the workflow on CPU: deterministic, cached under a key of their
# training section and code (harness/training), a distilled student after its teacher. Every job that loads
# such a model waits for its trained.json (PLAN.model_inputs).


rule train:
    priority: 20  # first: most of the grid waits for its models
    input:
        lambda wc: PLAN.train_inputs(f"{CACHE}/models/{wc.folder}/trained.json"),
    output:
        f"{CACHE}/models/{{folder}}/trained.json",
    params:
        model=lambda wc, output: PLAN.train_job(output[0]),
        files=PLAN.untracked_model_args,
    wildcard_constraints:
        folder=r"[^/.][^/]*",
    threads: 1  # the trainers fix their own thread count: the weights must not depend on the machine's cores
    resources:
        gpu=0,  # 1 in the profiles: a job that runs a network gets a GPU of its own
    log:
        f"{RESULTS}/logs/train/{{folder}}.log",
    conda:
        "envs/stepbench.yaml"
    shell:
        "stepbench-job --gpus {resources.gpu} train {params.model:q} {params.files} > {log:q} 2>&1"
