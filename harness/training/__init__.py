"""Training of the embedded zoo's neural models: deterministic, on CPU, cached, with a progress bar.

A models.yaml entry with a `train:` section is trained by the workflow (`stepbench train MODEL`, the `train`
rule) and loaded from the folder the trainer writes, through the same adapter a downloaded checkpoint uses:

    digits-unet:
      adapter: diffusers_unet
      train: {trainer: diffusion_unet, dataset: digits, seed: 0, config: {...}}

The folder is RESULTS/cache/models/<trainer>-<key>, keyed by the training section, the model's noise
process, the trainer's code and, for a distilled student, its teacher's key: the same config on the same
code is trained once, and an edited one is trained again under a new name. `trained.json`, written last,
records what was trained and how long it took.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from harness import accounting
from harness.errors import ConfigError, StepbenchError, valid_names

HARNESS = Path(__file__).resolve().parents[1]
# trainer name -> (module:function, the files of the harness its weights depend on: a change to one trains anew)
SHARED = ("training/common.py", "datasets.py", "schedules.py")
TRAINERS = {
    "diffusion_unet": ("harness.training.diffusion:train_unet", ("training/diffusion.py", *SHARED)),
    "consistency_distillation": ("harness.training.consistency:distill",
                                 ("training/consistency.py", "training/diffusion.py", "models/diffusers_unet.py",
                                  "models/consistency.py", "models/base.py", *SHARED)),
    "tarflow": ("harness.training.tarflow:train_for_zoo", ("training/tarflow.py", "models/tarflow.py", *SHARED)),
}
MARKER = "trained.json"


def training_spec(spec: dict, where: str) -> dict:
    train = spec["train"]
    if not isinstance(train, dict) or train.get("trainer") not in TRAINERS:
        name = train.get("trainer") if isinstance(train, dict) else train
        raise ConfigError(f"key '{where}.train.trainer': {name!r} unknown{valid_names(name, TRAINERS)}")
    return train


def code_hash(trainer: str) -> str:
    """The trainer's code: the files its weights depend on, read as files (not the loaded modules: the
    workflow and the training job must compute the same key)."""
    digest = hashlib.sha256()
    for path in sorted(HARNESS / name for name in TRAINERS[trainer][1] if (HARNESS / name).exists()):
        digest.update(path.name.encode() + b"\n" + path.read_bytes())
    return digest.hexdigest()[:16]


def annotate_keys(models: dict[str, dict], path) -> None:
    """Give every trained entry its `train_key` (a teacher's key is part of its student's), in place; a teacher
    that is not in the file, or a cycle, is one line."""
    from harness.config import config_hash

    def key(model_id: str, chain: tuple[str, ...]) -> str:
        if model_id in chain:
            raise ConfigError(f"{path}: key '{model_id}.train.teacher': a cycle ({' -> '.join(chain + (model_id,))})")
        spec = models[model_id]
        if "train_key" in spec:
            return spec["train_key"]
        train = training_spec(spec, model_id)
        teacher = train.get("teacher")
        teacher_key = None
        if teacher is not None:
            if teacher not in models or "train" not in models[teacher]:
                raise ConfigError(f"{path}: key '{model_id}.train.teacher': {teacher!r} is not a trained model of "
                                  f"this file{valid_names(teacher, [m for m in models if 'train' in models[m]])}")
            teacher_key = key(teacher, chain + (model_id,))
        spec["train_key"] = config_hash(train, spec.get("process"), code_hash(train["trainer"]), teacher_key)
        return spec["train_key"]

    for model_id, spec in models.items():
        if "train" in spec:
            key(model_id, ())


def trained_folder(cache_dir, spec: dict) -> Path:
    return Path(cache_dir) / "models" / f"{spec['train']['trainer']}-{spec['train_key']}"


def trained_source(spec: dict, cache_dir, model_id: str = "this model") -> Path:
    """The folder a trained entry loads from; one line saying how to make it when it is not there."""
    if cache_dir is None:
        raise StepbenchError(f"{model_id} is trained by the workflow: give the cache it was trained into (--cache-dir)")
    folder = trained_folder(cache_dir, spec)
    if not (folder / MARKER).is_file():
        raise StepbenchError(f"{folder}: {model_id} is not trained yet; run `stepbench train {model_id} "
                             f"--cache-dir {cache_dir}` (the workflow's train rule does)")
    return folder


def train_model(model_id: str, models: dict[str, dict], cache_dir) -> Path:
    """Train `model_id` (and, first, its teacher) unless its folder exists; returns the folder."""
    from harness.files import write_json
    from harness.registry import _import

    spec = models[model_id]
    folder = trained_folder(cache_dir, spec)
    if (folder / MARKER).is_file():
        return folder
    train = training_spec(spec, model_id)
    teacher = train.get("teacher")
    if teacher is not None:
        train_model(teacher, models, cache_dir)
    function = _import(TRAINERS[train["trainer"]][0])
    staging = folder.with_name(f".{folder.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)  # a training killed halfway starts again
    staging.mkdir(parents=True)
    start = time.perf_counter()
    with accounting.timed("training"):
        record = function(model_id, spec, models, Path(cache_dir), staging)
    record = {"model": model_id, "trainer": train["trainer"], "train": train, "train_key": spec["train_key"],
              "wall_s": time.perf_counter() - start, **(record or {})}
    write_json(staging / MARKER, record)
    try:  # in one rename, onto nothing or the empty folder Snakemake made for the marker
        os.replace(staging, folder)
    except OSError:
        if not (folder / MARKER).is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first; its weights are the same
    return folder


def describe(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())
