"""Consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2) of a trained diffusers UNet.

The student is the consistency model of harness.models.consistency on the EDM process of its models.yaml
entry: f(x, sigma) = c_skip x + c_out F(c_in x, 250 log sigma), F a UNet2DModel initialised from the teacher's
weights. The teacher is any Denoiser of the zoo (here digits-unet, a VP eps-prediction network): as a
Denoiser it works on the scaled variables x~ = x / alpha, sigma~, which is exactly EDM's variance-exploding
space, so the probability-flow ODE it defines is dx/dsigma = (x - D(x, sigma)) / sigma there.

Each step, for a batch of data x0 with labels y:
- n ~ U{0, ..., N-2} on the N Karras levels sigma_max = s_0 > ... > s_{N-1} = sigma_min (rho 7; indexed from
  sigma_max as diffusers does, so the paper's t_{n+1} > t_n are s_n > s_{n+1} here),
- x = x0 + s_n z,
- x^: one Heun step of the teacher's ODE from s_n to s_{n+1}, the teacher called with the same labels,
- loss = lambda d(f_theta(x, s_n), f_theta-(x^, s_{n+1})), f_theta- the EMA target (rate mu),
  d = L2 (mean squared) or pseudo-Huber sqrt(||a - b||^2 + c^2) - c (Song & Dhariwal 2023), lambda = 1.
The student starts from the teacher's weights, as in Song et al. Their teacher is an EDM network, which already
computes f's form; a VP eps-network does not (its time input is t_vp, not 250 log sigma, and it predicts eps), so
f starts far from the teacher's denoiser and the first steps mostly relearn the time and output conventions.
Measured here on digits-unet (340 steps at batch 64, about 90 CPU-seconds, FID on digits-cnn at 1 / 2 / 4 steps;
the teacher's euler and dpmpp_2m give 2.42 at 1 and 2 NFE):
  L2, lr 2e-4, mu 0.95: 3.72 / 0.75 / 0.68;  pseudo-Huber, lr 4e-4, mu 0.95: 3.42 / 0.74 / 0.56;
  the same with N = 10 levels: 1.35 / 0.95 / 0.92;  pseudo-Huber, lr 4e-4, mu 0.5: 0.48 / 0.51 / 0.50 (the default);
  mu 0 (iCT's target, the student itself): 0.66 at 1 step.
A short budget wants a fast target: with mu 0.95 the consistency of the top levels, from which 1-step sampling
starts, has not yet propagated up the 17 intervals.
Class labels go to the teacher too; with `label_dropout` a fraction of them is the null class, so that the
student has an unconditional model as well.

The folder is save_pretrained's (config.json, diffusion_pytorch_model.safetensors) with a
CMStochasticIterativeScheduler config beside it (num_train_timesteps = N), so the student loads as a hub
consistency checkpoint does. The saved weights are a slower EMA (`ema`) of theta, as Song et al. evaluate.
Deterministic: one thread count, deterministic kernels, every random draw from one seeded generator.

    train: {trainer: consistency_distillation, teacher: digits-unet, dataset: digits, seed: 0, config: {...}}
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from harness.errors import ConfigError, valid_names
from harness.models.consistency import ConsistencyParametrisation
from harness.schedules import make_process
from harness.training.common import Batches, dataset_tensors, deterministic_cpu, ema_update, warmup_cosine_schedule

DEFAULTS = {
    "levels": 18,  # N: the Karras discretisation (18 for CIFAR-10 in Song et al.)
    "rho": 7.0,
    "sigma_data": 0.5,
    "clip_denoised": True,  # the sampler clamps f to the data range [-1, 1] (training does not)
    "steps": 340,  # about 90 s on one thread: the student is on the default grid's critical path
    "batch_size": 64,
    "lr": 4e-4,
    "min_lr": 1e-5,
    "warmup_steps": 50,
    "target_ema": 0.5,  # mu of f_theta- (0.95 in Song et al.'s CIFAR-10 CD; see above)
    "ema": 0.99,  # of the saved weights
    "distance": "pseudo_huber",
    "huber_c": None,  # pseudo-Huber's c; None: 0.00054 sqrt(d) (Song & Dhariwal 2023), d the data dimension
    "label_dropout": 0.1,
    "threads": 1,
}
DISTANCES = ("l2", "pseudo_huber")


def checked_config(config: dict, where: str) -> dict:
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"key '{where}.{unknown[0]}': unknown{valid_names(unknown[0], DEFAULTS)}")
    cfg = {**DEFAULTS, **config}
    if cfg["distance"] not in DISTANCES:
        raise ConfigError(f"key '{where}.distance': {cfg['distance']!r} unknown{valid_names(cfg['distance'], DISTANCES)}")
    for key in ("levels", "steps", "batch_size", "threads"):
        if not isinstance(cfg[key], int) or cfg[key] < (2 if key == "levels" else 1):
            raise ConfigError(f"key '{where}.{key}': an integer >= {2 if key == 'levels' else 1}, not {cfg[key]!r}")
    return cfg


def heun_step(teacher, x, sigma_from, sigma_to, labels):
    """One Heun step of the teacher's PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma, per row (sigma_* are [B])."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    s_from, s_to = sigma_from.view(shape), sigma_to.view(shape)
    d = (x - teacher(x, sigma_from, labels)) / s_from
    x_euler = x + (s_to - s_from) * d
    d_next = (x_euler - teacher(x_euler, sigma_to, labels)) / s_to
    return x + (s_to - s_from) * (d + d_next) / 2


def distance(a, b, kind: str, c: float):
    squared = (a - b).flatten(1).pow(2).sum(1)
    if kind == "l2":
        return squared.mean() / a[0].numel()  # the mean squared error
    return (torch.sqrt(squared + c**2) - c).mean()


def distill(model_id: str, spec: dict, models: dict, cache_dir: Path, out: Path) -> dict:
    """Distil the entry's teacher into a consistency student and write it to `out`."""
    from diffusers import CMStochasticIterativeScheduler
    from tqdm import tqdm

    from harness.models import load_denoiser

    train = spec["train"]
    where = f"{model_id}.train"
    cfg = checked_config(train.get("config", {}), f"{where}.config")
    process = make_process(spec["process"])
    if process.kind != "edm":
        raise ConfigError(f"key '{model_id}.process': a consistency student lives on the edm process, not {process.kind}")
    teacher_id = train.get("teacher")
    if teacher_id is None:
        raise ConfigError(f"key '{where}.teacher': the consistency_distillation trainer needs a teacher model id")
    teacher = load_denoiser(models[teacher_id], "cpu", cache_dir, teacher_id)
    if process.sigma_min < teacher.process.sigma_min * (1 - 1e-9) or process.sigma_max > teacher.process.sigma_max:
        raise ConfigError(f"key '{model_id}.process': sigma {process.sigma_min:g} to {process.sigma_max:g} leaves the "
                          f"teacher {teacher_id}'s range {teacher.process.sigma_min:g} to {teacher.process.sigma_max:g}")
    param = ConsistencyParametrisation(num_train_timesteps=cfg["levels"], sigma_min=process.sigma_min,
                                       sigma_max=process.sigma_max, sigma_data=cfg["sigma_data"], rho=cfg["rho"],
                                       clip_denoised=cfg["clip_denoised"])
    training_f = ConsistencyParametrisation(**{**param.scheduler_config(), "clip_denoised": False})
    levels = torch.as_tensor(param.training_levels(), dtype=torch.float32)
    images, labels = dataset_tensors(train.get("dataset", "digits"))
    num_classes, null_class = teacher.info.num_classes, teacher.info.null_class
    huber_c = cfg["huber_c"] if cfg["huber_c"] is not None else 0.00054 * float(np.sqrt(images[0].numel()))
    seed = int(train.get("seed", 0))

    def f(net, x, sigma, y):
        return training_f.apply(lambda x_in, t, y: net(x_in, t, class_labels=y).sample, x, sigma, y)

    losses = []
    with deterministic_cpu(cfg["threads"], seed):
        generator = torch.Generator().manual_seed(seed)
        student = copy.deepcopy(teacher.module).train().requires_grad_(True)  # the teacher's weights
        target = copy.deepcopy(student).requires_grad_(False)
        ema = copy.deepcopy(student).requires_grad_(False)
        optimizer = torch.optim.Adam(student.parameters(), lr=cfg["lr"])
        schedule = warmup_cosine_schedule(optimizer, cfg)
        batches = Batches(len(images), cfg["batch_size"], generator)
        bar = tqdm(total=cfg["steps"], desc=f"distil {model_id}", unit="step", mininterval=2.0)
        start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(cfg["steps"]):
            index = batches.next()
            x0, y = images[index], (labels[index] if num_classes else None)
            if num_classes and cfg["label_dropout"] > 0:
                drop = torch.rand(len(index), generator=generator) < cfg["label_dropout"]
                y = torch.where(drop, null_class, y)
            n = torch.randint(0, len(levels) - 1, (len(index),), generator=generator)
            z = torch.randn(x0.shape, generator=generator)
            s_hi, s_lo = levels[n], levels[n + 1]  # adjacent levels, s_hi nearer the noise
            x_hi = x0 + s_hi.view(-1, 1, 1, 1) * z
            with torch.no_grad():
                x_hat = heun_step(teacher, x_hi, s_hi, s_lo, y).clone()  # the teacher's ODE; clone: out of inference mode
                goal = f(target, x_hat, s_lo, y)
            loss = distance(f(student, x_hi, s_hi, y), goal, cfg["distance"], huber_c)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            ema_update(target, student, cfg["target_ema"])
            ema_update(ema, student, cfg["ema"])
            losses.append(loss.item())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4g}", refresh=False)
            bar.update(1)
        bar.close()
        # the CPU time too: on a machine shared with other jobs it is what one free thread would take
        timings = {"distillation_s": time.perf_counter() - start, "distillation_cpu_s": time.process_time() - cpu_start}
    ema.save_pretrained(out)
    CMStochasticIterativeScheduler(**param.scheduler_config()).save_config(out)
    return {"teacher": teacher_id, "steps": cfg["steps"], "levels": cfg["levels"], "distance": cfg["distance"],
            "final_loss": float(np.mean(losses[-100:])), "parameters": sum(p.numel() for p in ema.parameters()),
            **timings}
