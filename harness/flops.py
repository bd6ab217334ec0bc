"""FLOPs measured, not declared: torch's FlopCounterMode over real calls.

FlopCounterMode counts the matmuls, convolutions and attention of a call (2 FLOPs per multiply-add), not
elementwise work, so an analytic model made of elementwise operations (gmm2d) counts 0 and one made of
matmuls (digits-ideal's softmax-weighted sums) counts those.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def flops_per_call(denoiser, batch_size: int, sigma: float = 1.0) -> float:
    """FLOPs of one denoiser call on a batch of `batch_size` (zeros at noise level sigma~)."""
    info = denoiser.info
    x = torch.zeros((batch_size, *info.data_shape), dtype=info.dtype, device=info.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        denoiser(x, sigma)
    return float(counter.get_total_flops())
