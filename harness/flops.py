"""FLOPs measured, not declared: torch's FlopCounterMode over a real call of the model, once per model.

FlopCounterMode counts the matmuls, convolutions and attention of a call (2 FLOPs per multiply-add), not
elementwise work, so an analytic model made of elementwise operations (gmm2d) counts 0 and one made of
matmuls (digits-ideal's softmax-weighted sums) counts those. The count is cached per (model entry, batch
size), like the other reference work: a dispatch mode imports torch._dynamo (1.3 s) on its first use, which
a sampling job should not pay, and a cell's cost is then the audited calls times the measured FLOPs per row.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.config import config_hash
from harness.files import write_json


def flops_path(cache_dir, model_id: str, model_spec: dict, batch_size: int) -> Path:
    return Path(cache_dir) / "flops" / f"{model_id}-b{batch_size}-{config_hash(model_spec, batch_size)}.json"


def measure(denoiser, batch_size: int, sigma: float = 1.0) -> dict:
    """FLOPs of one denoiser call on a batch of `batch_size` (zeros at noise level sigma~), and per row."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    info = denoiser.info
    x = torch.zeros((batch_size, *info.data_shape), dtype=info.dtype, device=info.device)
    # force_eager: a torch.compile'd network (params.compile) counted in its aten operations, not its fused kernels
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        rows = denoiser.flops_call(x, sigma)  # network rows: batch_size for a denoiser, token evaluations for a flow
    total = float(counter.get_total_flops())
    return {"flops_per_call": total, "batch_size": batch_size, "flops_per_row": total / rows,
            "counter": "torch.utils.flop_counter.FlopCounterMode (matmul, convolution, attention; 2 per MAC)"}


def load_or_measure(cache_dir, model_id: str, model_spec: dict, batch_size: int, denoiser=None,
                    device="cpu") -> dict:
    """The model's cached FLOP count at this batch size, measured (and cached) first if missing."""
    path = flops_path(cache_dir, model_id, model_spec, batch_size)
    if path.is_file():
        return json.loads(path.read_text())
    if denoiser is None:
        from harness.models import load_denoiser

        denoiser = load_denoiser(model_spec, device, cache_dir, model_id)
    record = measure(denoiser, batch_size)
    write_json(path, record)
    return record
