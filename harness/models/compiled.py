"""torch.compile of a model's network (models.yaml `params.compile`), once per process.

A grid's jobs run in warm worker processes (harness.worker) that serve many cells one after another, and every
cell loads its model afresh (harness.cells). Compiling there would cost every cell the compile again (tens of
seconds for a UNet); so a compiled network is kept, with the module it wraps, in this process-wide table keyed by
what makes it the same network: the component folder's files (names, sizes, mtimes: retrained weights are new),
the class, dtype, device and mode. A later cell of the same model in the same worker gets the same compiled
module, whose code Dynamo has already generated for NetworkDenoiser's fixed chunk shape.

    params: {compile: false (default) | true (torch.compile's default mode) | default | max-autotune-no-cudagraphs}

The CUDA-graph modes (reduce-overhead, max-autotune) are refused: their outputs live in buffers the next call
overwrites, and NetworkDenoiser keeps each chunk's output while it runs the next. Only the denoising network is
compiled, not the VAE or text encoder (called once per sample, not once per step). On a CPU the compiled
kernels keep the thread count of their first call. The eager module stays the Denoiser's `module` (quantised
copies, FLOP counts and other transforms start from it).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from harness.errors import ConfigError
from harness.models.checkpoint import Checkpoint, WeightsFile, load_module

MODES = ("default", "max-autotune-no-cudagraphs")
KEEP = 2  # networks kept per process: a cell's model and a model run beside it (stitch)
_COMPILED: OrderedDict[tuple, tuple[torch.nn.Module, torch.nn.Module]] = OrderedDict()


def compile_mode(params: dict, source: str) -> str | None:
    """params.compile as a torch.compile mode, None for an eager network."""
    value = params.get("compile", False)
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if value not in MODES:
        raise ConfigError(f"{source}: params.compile is true, false or one of {', '.join(MODES)}, not {value!r}"
                          + (" (CUDA-graph modes reuse their output buffers between calls)"
                             if value in ("reduce-overhead", "max-autotune") else ""))
    return value


def load_network(checkpoint: Checkpoint, subfolder: str | None, cls, dtype: torch.dtype, device: torch.device,
                 params: dict, weights: WeightsFile | None = None, prepare: tuple[tuple, Callable] | None = None
                 ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module, network): the component as load_module loads it (with `weights` in place of its own, if given), on
    `device`, and what the Denoiser calls, the module itself or, with params.compile, its compiled twin, shared by
    every cell of this process.
    `prepare` = (key, fn): fn(module) changes the loaded module before it is moved and compiled (diffusers_lcm
    fuses a LoRA into it), and key names that change (the LoRA file), so the same UNet without it is another entry."""
    mode = compile_mode(params, checkpoint.source)
    prepared, change = prepare if prepare is not None else ((), None)

    def load():
        module = load_module(checkpoint, subfolder, cls, dtype, weights)
        return (change(module) if change is not None else module).to(device)

    if mode is None:
        module = load()
        return module, module
    key = (_fingerprint(checkpoint, subfolder), _file_key(weights.path) if weights else None, cls.__qualname__,
           str(dtype), str(device), mode, prepared)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    module = load()
    # dynamic=False: NetworkDenoiser calls with one chunk shape; the default would retrace for a second one
    compiled = torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)
    _COMPILED[key] = (module, compiled)
    while len(_COMPILED) > KEEP:
        _COMPILED.popitem(last=False)
    return module, compiled


def _fingerprint(checkpoint: Checkpoint, subfolder: str | None) -> tuple:
    folder = checkpoint.folder(subfolder).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return str(folder), tuple(files)


def _file_key(path) -> tuple:
    """A weights file from elsewhere (load_network's `weights`), as _fingerprint keys the component's files."""
    return str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns


def forget_compiled() -> None:
    """Drop the kept networks (tests; a process that wants its memory back)."""
    _COMPILED.clear()
