"""Training a TarFlow on embedded images (the digits), as apple/ml-tarflow's train.py and its MNIST
notebook do: maximum likelihood of data + N(0, noise_std^2) under the flow (`TarFlow.nll_loss`),
AdamW with betas (0.9, 0.95) and weight decay 1e-4, a linear warm-up then a cosine decay to min_lr,
class labels dropped to "unconditional" (-1) with probability drop_label so that guidance has an
unconditional model to push against.

Deterministic: the weights depend only on (config, images, labels, seed). Initialisation, batch order,
noise and label drops all come from `seed`; training runs on CPU in float32 with
torch.use_deterministic_algorithms(True) and a fixed thread count (`threads`: a different count may
sum in a different order), and the caller's RNG, thread count and determinism flag are restored
afterwards. A fixed step count, not a time budget, ends it.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from harness.errors import ConfigError, valid_names
from harness.models.tarflow import TarFlow
from harness.training.common import deterministic_cpu, warmup_cosine_schedule

# The embedded digits-tarflow: the sizing of issue 17's trial (patch 1, T = 64 tokens, 4 blocks x 2
# layers, 64 channels). One thread: on the shared 2-core machine, 2 threads made a step 3-4x slower
# (0.67-0.87 s against 0.23 s at batch 64, another job running). 800 steps (28 epochs) took 169 s
# beside other jobs (load 1-2), within the 3 minutes; 900 took 189-215 s and reached FID 0.16
# instead of 0.21 (conditional samples, digits-cnn).
DIGITS_TARFLOW = {
    "model": {"in_channels": 1, "img_size": 8, "patch_size": 1, "channels": 64, "num_blocks": 4,
              "layers_per_block": 2, "head_dim": 64, "expansion": 4, "num_classes": 10, "noise_std": 0.1},
    "steps": 800,
    "batch_size": 64,
    "lr": 2e-3,  # the MNIST notebook's
    "min_lr": 1e-6,
    "warmup_steps": 100,
    "weight_decay": 1e-4,
    "drop_label": 0.1,
    "threads": 1,
}
TRAIN_KEYS = {"model", "steps", "batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "drop_label", "threads"}


def train(config: dict, images, labels, *, seed: int, progress: bool = True) -> TarFlow:
    """A TarFlow trained on images [N, C, H, W] (float, data space) and labels [N] (ignored when the
    model has no classes) by `config` (keys of DIGITS_TARFLOW); returns it in eval mode on CPU."""
    from tqdm.auto import tqdm

    cfg = _checked(config)
    x_all = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n, batch = x_all.shape[0], min(cfg["batch_size"], x_all.shape[0])
    with deterministic_cpu(cfg["threads"], seed):
        gen = torch.Generator().manual_seed(seed)  # batch order, noise and label drops
        model = TarFlow.from_config(cfg["model"], where="training config 'model'")
        if tuple(x_all.shape[1:]) != model.data_shape:
            raise ConfigError(f"training images are {list(x_all.shape[1:])}, the model config makes "
                              f"{list(model.data_shape)}")
        conditional = model.config.num_classes > 0
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95),
                                      weight_decay=cfg["weight_decay"])
        schedule = warmup_cosine_schedule(optimizer, cfg)  # the shape of apple's CosineLRSchedule
        order, cursor = torch.randperm(n, generator=gen), 0
        bar = tqdm(total=cfg["steps"], desc="train tarflow", unit="step", disable=not progress)
        t0 = time.perf_counter()
        for step in range(cfg["steps"]):
            if cursor + batch > n:  # a new epoch, drop_last as apple's loader
                order, cursor = torch.randperm(n, generator=gen), 0
            index = order[cursor:cursor + batch]
            cursor += batch
            x = x_all[index]
            x = x + model.config.noise_std * torch.randn(x.shape, generator=gen)
            y = None
            if conditional:
                y = y_all[index]
                y = torch.where(torch.rand(batch, generator=gen) < cfg["drop_label"], -1, y)
            optimizer.zero_grad(set_to_none=True)
            loss = model.nll_loss(x, y)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 10 == 0 or step == cfg["steps"] - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            bar.update(1)
        bar.close()
        model.training_seconds = time.perf_counter() - t0  # not saved: a record for the caller's log
    return model.eval()


def _checked(config: dict) -> dict:
    unknown = sorted(set(config) - TRAIN_KEYS)
    if unknown:
        raise ConfigError(f"training config: unknown key {unknown[0]!r}{valid_names(unknown[0], sorted(TRAIN_KEYS))}")
    cfg = {**{k: v for k, v in DIGITS_TARFLOW.items() if k != "model"}, **config}
    if "model" not in cfg:
        raise ConfigError("training config: key 'model' (the TarFlow's arguments) missing")
    for key in ("steps", "batch_size", "threads"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"training config: {key} must be an integer >= 1, not {cfg[key]!r}")
    if not isinstance(cfg["warmup_steps"], int) or not 0 <= cfg["warmup_steps"] < cfg["steps"]:
        raise ConfigError(f"training config: warmup_steps must be an integer in [0, steps), "
                          f"not {cfg['warmup_steps']!r}")
    if not 0 <= cfg["drop_label"] <= 1:
        raise ConfigError(f"training config: drop_label must be in [0, 1], not {cfg['drop_label']!r}")
    if not 0 < cfg["min_lr"] <= cfg["lr"]:
        raise ConfigError("training config: need 0 < min_lr <= lr")
    return cfg


def train_for_zoo(model_id: str, spec: dict, models: dict, cache_dir, out) -> dict:
    """The workflow's trainer (harness.training.TRAINERS["tarflow"]), with the diffusion_unet trainer's interface:
    trains the entry's TarFlow and writes it to `out` as save_pretrained does (config.json + model.safetensors),
    the folder the `tarflow` adapter loads. `train.config` overrides DIGITS_TARFLOW's keys (`model` as a whole:
    a partial architecture is completed from DIGITS_TARFLOW's); `train.conditional: false` trains without labels."""
    from harness.models.tarflow import save_pretrained
    from harness.training.common import dataset_tensors

    section = spec["train"]
    config = dict(section.get("config", {}))
    config["model"] = {**DIGITS_TARFLOW["model"], **config.get("model", {})}
    images, labels = dataset_tensors(section.get("dataset", "digits"))
    if not section.get("conditional", True):
        config["model"]["num_classes"] = 0
    try:
        model = train(config, images, labels, seed=int(section.get("seed", 0)))
    except ConfigError as err:
        raise ConfigError(f"key '{model_id}.train.config': {err}") from None
    save_pretrained(model, out)
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(images[:500]), dtype=torch.float32)
        y = torch.as_tensor(labels[:500]) if model.config.num_classes else None
        nll = float(model.nll_loss(x, y))
    return {"steps": _checked(config)["steps"], "nll_per_dim_first_500": nll,
            "num_classes": model.config.num_classes, "parameters": sum(p.numel() for p in model.parameters()),
            "train_loop_s": model.training_seconds}
