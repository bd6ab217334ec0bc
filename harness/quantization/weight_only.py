"""torchao's `quantize_` configs: `w8` (int8 weight-only) anywhere, and on CUDA int8/float8
activations too.

`quantize_` swaps the weights of nn.Linear modules only (its default filter, `_is_linear`); a
UNet's convolutions, which carry most of its FLOPs, stay fp32. So in a UNet2DModel `w8` touches the
time embedding, the resnets' time_emb_proj and the attention projections, and its size and speed
gain is correspondingly small (measured in benchmarks/quantization_speed.py).

On CPU the int8 weights are dequantised inside Inductor's fused kernels (fp32 math, int8 storage).
It is compiled *without* freezing: with freezing on, Inductor constant-folds the dequantisation and
calls fp32 mkl linear on fp32 copies of the weights (checked in the generated code, torchao 0.18),
which is fp32 with extra steps. On CUDA, Int8DynamicActivationInt8WeightConfig (`w8a8`) runs
torch._int_mm and Float8DynamicActivationFloat8WeightConfig (`fp8`) float8 GEMMs (compute
capability >= 8.9); their activation scales are dynamic (per call), so calibration is unused.
"""

from __future__ import annotations

import copy

import torch

from harness.errors import ConfigError
from harness.quantization.base import Artifact, QuantizedNet, TensorNet, net_sha256

NOTES = {
    ("w8", "cpu"): "fp32 math on int8-stored Linear weights (dequantised in fused kernels); convolutions fp32",
    ("w8", "cuda"): "int8-stored Linear weights (torchao Int8WeightOnly); convolutions in the network's dtype",
    ("w8a8", "cuda"): "int8 x int8 Linear GEMMs with dynamic activation scales (torchao Int8DynamicActivationInt8Weight, "
                      "torch._int_mm); convolutions in the network's dtype",
    ("fp8", "cuda"): "float8 e4m3 Linear GEMMs with dynamic activation scales "
                     "(torchao Float8DynamicActivationFloat8Weight); convolutions in the network's dtype",
}


def _config(scheme: str, device: torch.device):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if scheme == "w8":
        # set_inductor_config=False: torchao would otherwise change process-wide Inductor settings
        # (coordinate descent tuning, ...) and with them every other compiled model's timings
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if device.type != "cuda":
        raise ConfigError(f"quantization scheme {scheme!r} through torchao's quantize_ needs CUDA here; "
                          f"on CPU use w8a8 (PT2E) or w8")
    if scheme == "w8a8":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"quantization scheme 'fp8' needs a GPU with float8 (compute capability >= 8.9), "
                          f"this one is {torch.cuda.get_device_capability(device)}")
    return Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False)


def quantize_linear(net: torch.nn.Module, scheme: str, *, fp32_modules=(), compile=True) -> QuantizedNet:
    from torchao.quantization import quantize_

    device = next(net.parameters()).device
    config = _config(scheme, device)
    qnet = copy.deepcopy(net).eval()  # quantize_ works in place; the caller's network stays fp32
    keep = tuple(fp32_modules)
    quantize_(qnet, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
              and not any(fqn == k or fqn.startswith(k + ".") for k in keep))
    wrapped = TensorNet(qnet)
    artifact = Artifact({}, {"scheme": scheme, "simulate": False, "net_sha256": net_sha256(net),
                             "fp32_modules": list(keep), "device": device.type})
    return QuantizedNet(runner=torch.compile(wrapped) if compile else wrapped, scheme=scheme, simulated=False,
                        module=qnet, artifact=artifact, compiled=compile, capture_kernels=compile,
                        kernel_note=NOTES[(scheme, device.type if device.type == "cuda" else "cpu")])
