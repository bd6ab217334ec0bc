"""Post-training quantisation of a diffusion network: the machinery behind the `quantized` family.

A network here is a plain torch.nn.Module called `net(x_t, t, class_labels=None)` like a diffusers
UNet2DModel. `quantize` returns a QuantizedNet, callable the same way and returning a tensor:

| scheme | device | what runs | calibration |
|---|---|---|---|
| w8a8 | CPU | PT2E static int8: oneDNN int8 qconv/qlinear, compiled with freezing (pt2e.py) | observers' ranges |
| w8 | any | torchao Int8WeightOnlyConfig on nn.Linear, compiled (weight_only.py) | none |
| w8a8, fp8 | CUDA | torchao int8 / float8 dynamic-activation configs on nn.Linear (weight_only.py) | none (dynamic) |
| wNaM, simulate=True | any | fake-quant, fp32 kernels, no speed claim (simulate.py) | activation ranges |

The artifact (`qnet.artifact`, saved by `save_artifact` as one safetensors file with JSON metadata,
no pickle) rebuilds the network with `rebuild` without recalibrating, and refuses another network
(weights fingerprint). `qnet.record()` is what a cell records: scheme, simulated, size_bytes,
precision (read from the compiled code for w8a8), compiled batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.errors import ConfigError, StepbenchError
from harness.quantization.base import Artifact, QuantizedNet, TensorNet, model_size_bytes, net_sha256
from harness.quantization.calibration import (
    TIMESTEP_KINDS,
    CalibrationInput,
    as_inputs,
    calibration_timesteps,
    normalise_calibration,
)

__all__ = ["SCHEMES", "TIMESTEP_KINDS", "Artifact", "CalibrationInput", "QuantizedNet", "TensorNet", "as_inputs",
           "calibration_timesteps", "fp32_size_bytes", "load_artifact", "model_size_bytes", "normalise_calibration",
           "quantize", "rebuild", "save_artifact"]

SCHEMES = ("w8a8", "w8", "fp8")  # real kernels; any wNaM / wN with simulate=True
_META_KEY = "stepbench.quantization"


def quantize(net: torch.nn.Module, scheme: str, calibration=None, *, simulate: bool = False, fp32_modules=(),
             keep_8bit=None, compile: bool = True, batch_size: int | None = None, progress: bool = True) -> QuantizedNet:
    """Quantised copy of `net` (the network itself is not modified).

    calibration: list of (x_t, t, class_labels) tuples (needed by w8a8 on CPU and by simulate).
    fp32_modules: module names kept in fp32 (w8a8 PT2E, w8, CUDA schemes).
    keep_8bit: simulate only: layers kept at 8-bit weights (None: the first and the last).
    batch_size: the batch the compiled w8a8 graph is built for (None: the first call's).
    """
    if not isinstance(net, torch.nn.Module):
        raise ConfigError(f"quantize: expected a torch.nn.Module, got {type(net).__name__}")
    device = next(net.parameters()).device
    if simulate:
        from harness.quantization.simulate import simulate as fake_quant

        return fake_quant(net, scheme, normalise_calibration(calibration, scheme), keep_8bit=keep_8bit, progress=progress)
    if scheme not in SCHEMES:
        hint = "; it has no fast kernel here: set simulate: true" if scheme.startswith("w") else ""
        raise ConfigError(f"quantization scheme {scheme!r} unknown{hint}; "
                          f"valid: {', '.join(SCHEMES)} (or any wNaM with simulate: true)")
    if scheme == "w8a8" and device.type == "cpu":
        from harness.quantization.pt2e import w8a8

        return w8a8(net, normalise_calibration(calibration, scheme), fp32_modules=fp32_modules, compile=compile,
                    batch_size=batch_size, progress=progress)
    from harness.quantization.weight_only import quantize_linear

    return quantize_linear(net, scheme, fp32_modules=fp32_modules, compile=compile)


def rebuild(net: torch.nn.Module, artifact: Artifact, *, compile: bool = True,
            batch_size: int | None = None) -> QuantizedNet:
    """The quantised network an artifact describes, from the same fp32 `net`, without calibrating."""
    meta = artifact.meta
    if meta.get("net_sha256") != net_sha256(net):
        raise StepbenchError(f"quantization artifact ({meta.get('scheme')}) was calibrated on another network "
                             f"(weights fingerprint differs); recalibrate")
    if meta["simulate"]:
        from harness.quantization.simulate import simulate as fake_quant

        return fake_quant(net, meta["scheme"], None, keep_8bit=tuple(meta["keep_8bit"]), qparams=artifact)
    if meta["scheme"] == "w8a8" and meta.get("example_shape") is not None:
        from harness.quantization.pt2e import w8a8

        device = next(net.parameters()).device
        # export needs only shapes; no forward of this example feeds an observer
        example = (torch.zeros(2, *meta["example_shape"], device=device), torch.zeros(2, device=device),
                   torch.zeros(2, dtype=torch.int64, device=device) if meta["conditional"] else None)
        qnet = w8a8(net, [example], fp32_modules=tuple(meta["fp32_modules"]), compile=compile, batch_size=batch_size,
                    progress=False, observers=artifact.tensors)
        qnet.artifact.meta["calibration_inputs"] = meta.get("calibration_inputs")
        return qnet
    return quantize(net, meta["scheme"], fp32_modules=tuple(meta.get("fp32_modules", ())), compile=compile)


def save_artifact(path, artifact: Artifact) -> Path:
    """One .safetensors file: the tensors, and the metadata as JSON in its header (no pickle)."""
    import torchao
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**artifact.meta, "versions": {"torch": torch.__version__, "torchao": torchao.__version__}}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in artifact.tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    tmp.replace(path)
    return path


def load_artifact(path) -> Artifact:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise StepbenchError(f"{path}: quantization artifact missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
        return Artifact(load_file(str(path)), meta)
    except (KeyError, ValueError, OSError) as e:  # not ours, or damaged
        raise StepbenchError(f"{path}: not a stepbench quantization artifact ({type(e).__name__}: {e})") from None


def fp32_size_bytes(net: torch.nn.Module) -> int:
    """The full-precision network's size, counted the same way as a quantised one's."""
    return model_size_bytes(net)
