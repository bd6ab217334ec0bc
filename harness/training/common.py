"""What every trainer shares: deterministic CPU training, the learning-rate shape, the training data."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def deterministic_cpu(threads: int, seed: int):
    """A fixed thread count (another may sum in another order), deterministic kernels and torch's global RNG
    seeded (initial weights), for the block; the caller's settings and RNG are restored afterwards."""
    saved_threads, saved_flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(saved_flag)
        torch.set_num_threads(saved_threads)


def warmup_cosine(lr: float, min_lr: float, warmup_steps: int, steps: int):
    """Factor of lr at each step (LambdaLR): linear from min_lr to lr over the warm-up, then cosine to min_lr."""
    lo = min_lr / lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return lo + (1 - lo) * (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, cfg: dict) -> torch.optim.lr_scheduler.LambdaLR:
    """warmup_cosine over a training config's lr, min_lr, warmup_steps and steps, as the trainers use it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["steps"]))


def dataset_tensors(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedded dataset as float32 images [N, C, H, W] in data space and int64 labels."""
    from harness.datasets import load_dataset

    images, labels = load_dataset(name)
    return torch.as_tensor(np.asarray(images), dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)


class Batches:
    """Shuffled batches without replacement within an epoch (the last short one dropped), from one generator."""

    def __init__(self, count: int, batch_size: int, generator: torch.Generator):
        self.count, self.batch, self.generator = count, min(batch_size, count), generator
        self.order, self.cursor = torch.randperm(count, generator=generator), 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch > self.count:
            self.order, self.cursor = torch.randperm(self.count, generator=self.generator), 0
        index = self.order[self.cursor:self.cursor + self.batch]
        self.cursor += self.batch
        return index


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for target, source in zip(ema.parameters(), model.parameters()):
            target.lerp_(source, 1.0 - decay)
        for target, source in zip(ema.buffers(), model.buffers()):
            target.copy_(source)
