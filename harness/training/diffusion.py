"""Training a class-conditional diffusers UNet2DModel on an embedded dataset (DDPM's objective).

The model's own noise process (models.yaml `process`, vp_discrete) gives the forward marginals
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at integer t ~ U{0..T-1}; the network predicts eps (or v) at
t, with the class label as diffusers' `class_labels` (num_class_embeds = classes + 1: the last is the null
class, given with probability `label_dropout` so that classifier-free guidance has an unconditional model).
Adam with a linear warm-up and cosine decay; the saved weights are an exponential moving average. The folder
is what diffusers' save_pretrained writes (config.json, diffusion_pytorch_model.safetensors) with the
DDPMScheduler config beside it, so the model loads through the same adapter a hub checkpoint uses.

    train: {trainer: diffusion_unet, dataset: digits, seed: 0, config: {model: {...}, steps: ..., ...}}
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness.errors import ConfigError, valid_names
from harness.schedules import make_process
from harness.training.common import Batches, dataset_tensors, deterministic_cpu, ema_update, warmup_cosine_schedule

DEFAULTS = {
    "model": {"block_out_channels": [32, 64], "layers_per_block": 1, "attention": True, "norm_num_groups": 8},
    "steps": 1500,
    "batch_size": 128,
    "lr": 2e-3,
    "min_lr": 1e-5,
    "warmup_steps": 100,
    "ema": 0.995,
    "label_dropout": 0.1,
    "prediction": "eps",
    "threads": 1,
}
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}


def build_unet(model: dict, image_shape: tuple[int, int, int], num_classes: int):
    """The UNet2DModel of a config: two or more resolutions, attention at the lowest when `attention`."""
    from diffusers import UNet2DModel

    channels = list(model["block_out_channels"])
    attention = model.get("attention", False)
    down = ["DownBlock2D"] * (len(channels) - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (len(channels) - 1)
    return UNet2DModel(sample_size=image_shape[1], in_channels=image_shape[0], out_channels=image_shape[0],
                       block_out_channels=channels, layers_per_block=model["layers_per_block"],
                       down_block_types=down, up_block_types=up, norm_num_groups=model["norm_num_groups"],
                       attention_head_dim=channels[-1] if attention else None,
                       num_class_embeds=num_classes + 1 if num_classes else None)


def checked_config(config: dict, where: str) -> dict:
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"key '{where}.{unknown[0]}': unknown{valid_names(unknown[0], DEFAULTS)}")
    cfg = {**DEFAULTS, **config, "model": {**DEFAULTS["model"], **config.get("model", {})}}
    if cfg["prediction"] not in PREDICTIONS:
        raise ConfigError(f"key '{where}.prediction': {cfg['prediction']!r} unknown{valid_names(cfg['prediction'], PREDICTIONS)}")
    for key in ("steps", "batch_size", "threads"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"key '{where}.{key}': an integer >= 1, not {cfg[key]!r}")
    return cfg


def train_unet(model_id: str, spec: dict, models: dict, cache_dir: Path, out: Path) -> dict:
    """Train the entry's UNet and write it to `out` (save_pretrained + scheduler config)."""
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    train = spec["train"]
    cfg = checked_config(train.get("config", {}), f"{model_id}.train.config")
    process = make_process(spec["process"])
    if process.kind != "vp_discrete":
        raise ConfigError(f"key '{model_id}.process': the diffusion_unet trainer needs vp_discrete, not {process.kind}")
    images, labels = dataset_tensors(train.get("dataset", "digits"))
    num_classes = int(labels.max()) + 1 if train.get("conditional", True) else 0
    abar = torch.as_tensor(np.cumprod(1.0 - process.betas), dtype=torch.float32)
    seed = int(train.get("seed", 0))
    losses = []
    with deterministic_cpu(cfg["threads"], seed):
        generator = torch.Generator().manual_seed(seed)
        net = build_unet(cfg["model"], tuple(images.shape[1:]), num_classes)
        ema = copy.deepcopy(net).requires_grad_(False)
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
        schedule = warmup_cosine_schedule(optimizer, cfg)
        batches = Batches(len(images), cfg["batch_size"], generator)
        bar = tqdm(total=cfg["steps"], desc=f"train {model_id}", unit="step", mininterval=2.0)
        for step in range(cfg["steps"]):
            index = batches.next()
            x0 = images[index]
            t = torch.randint(0, len(abar), (len(index),), generator=generator)
            eps = torch.randn(x0.shape, generator=generator)
            a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
            x_t = a * x0 + s * eps
            y = None
            if num_classes:
                drop = torch.rand(len(index), generator=generator) < cfg["label_dropout"]
                y = torch.where(drop, num_classes, labels[index])  # the null class
            target = eps if cfg["prediction"] == "eps" else a * eps - s * x0
            loss = F.mse_loss(net(x_t, t, class_labels=y).sample, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            ema_update(ema, net, cfg["ema"] if step >= cfg["warmup_steps"] else 0.0)
            losses.append(loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
            bar.update(1)
        bar.close()
    ema.save_pretrained(out)
    DDPMScheduler(num_train_timesteps=len(abar), trained_betas=process.betas.tolist(),
                  prediction_type=PREDICTIONS[cfg["prediction"]]).save_config(out)
    return {"steps": cfg["steps"], "final_loss": float(np.mean(losses[-100:])), "num_classes": num_classes,
            "parameters": sum(p.numel() for p in ema.parameters())}
