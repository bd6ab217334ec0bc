"""Writing and checking the files a result is made of.

Every output (samples, cell records, metrics, prepared artifacts, references, statistics, reports) is written
atomically: to a temporary file in the same folder, then renamed over the target, so a job killed halfway
leaves the old file or none, never half of one. Cached artifacts are stored in formats that hold data only
(safetensors, npz without pickles, JSON): a shared cache folder that anyone can write to must not be a way to
run code in every job that reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from harness.errors import StepbenchError


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: parallel jobs may race here
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str))


def save_npz(path: str | Path, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would append .npz to a name
        np.savez(handle, **arrays)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path) -> dict:
    """A JSON object, or one line naming the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StepbenchError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise StepbenchError(f"{path}: malformed JSON{where} (damaged or cut short?)") from None
    if not isinstance(data, dict):
        raise StepbenchError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# --- data-only artifacts: a nested structure of tensors, arrays and JSON values in one safetensors file ---

def save_artifact(path: str | Path, tree) -> None:
    """Dicts, lists, str/int/float/bool/None, torch tensors and numpy arrays, in one safetensors file: the
    tensors as tensors, the structure as JSON in its metadata."""
    from safetensors.torch import save_file

    tensors: dict = {}
    structure = json.dumps(_flatten(tree, tensors))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"stepbench_tree": structure})


def load_artifact(path: str | Path):
    """What save_artifact stored; anything else (a pickle, a damaged file) is one line, and nothing in it runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        structure = json.loads(metadata["stepbench_tree"])
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        raise StepbenchError(f"{path}: not a stepbench artifact (safetensors with its structure): "
                             f"{type(err).__name__}; delete it to rebuild") from None
    return _unflatten(structure, tensors)


def _flatten(value, tensors: dict):
    import torch

    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().clone(memory_format=torch.contiguous_format)  # own, dense storage
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
        return {"__ndarray__": name}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("artifact dict keys must be strings")
        return {"__dict__": {k: _flatten(v, tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_flatten(v, tensors) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in an artifact (tensors, arrays and JSON values only)")


def _unflatten(value, tensors: dict):
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            return tensors[value["__ndarray__"]].numpy()
        return {k: _unflatten(v, tensors) for k, v in value["__dict__"].items()}
    return value
