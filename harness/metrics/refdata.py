"""Reference data for distribution metrics: where the "real" images (or their statistics) come from.

models.yaml, per model, either `dataset: digits` (an embedded dataset) or
    reference_data: {kind: folder,     path: DIR}                    # image files, sorted by name
    reference_data: {kind: npz_images, path: F.npz, key: images}     # uint8 [N, H, W, 3] or [N, 3, H, W]
    reference_data: {kind: npz_stats,  path: F.npz}                  # EDM's mu/sigma: FID only
    reference_data: {kind: library,    name: cifar10-train, root: DIR}  # torch-fidelity's datasets
plus optional `num_images` (the first N, in file/dataset order). Nothing is downloaded: a library
dataset must already be in its cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.datasets import DATASETS, load_dataset
from harness.errors import ConfigError, StepbenchError, valid_names

KINDS = ("embedded", "folder", "npz_images", "npz_stats", "library")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class ReferenceSource:
    kind: str
    name: str  # embedded/library dataset name, or the file/folder path
    key: str | None = None  # npz array name
    root: str | None = None  # library datasets' cache folder
    num_images: int | None = None

    @property
    def has_images(self) -> bool:
        return self.kind != "npz_stats"

    def label(self) -> str:
        """Filename-safe, readable; uniqueness comes from the hash of describe() next to it."""
        base = self.name if self.kind in ("embedded", "library") else Path(self.name).stem or "ref"
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)

    def describe(self) -> dict:
        """What names the source in a cache key (not its content: see fingerprint())."""
        return {k: v for k, v in {"kind": self.kind, "name": self.name, "key": self.key, "root": self.root,
                                  "num_images": self.num_images}.items() if v is not None}

    def fingerprint(self) -> str:
        """Content identity checked against the cache: file hash, folder listing (names, sizes, mtimes)."""
        if self.kind in ("npz_images", "npz_stats"):
            from harness.metrics.features import file_sha256

            return file_sha256(_existing(Path(self.name), self.kind))
        if self.kind == "folder":
            listing = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in _image_files(Path(self.name))]
            return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return self.name  # embedded and library datasets are fixed by name


def reference_source(model_spec: dict, model_id: str) -> ReferenceSource:
    raw = model_spec.get("reference_data")
    if raw is None:
        if "dataset" not in model_spec:
            raise ConfigError(f"key '{model_id}.dataset' missing (or 'reference_data'); "
                              "fid/kid/is/prc need reference data")
        return embedded_source(model_spec["dataset"], f"{model_id}.dataset")
    kind = raw.get("kind")
    if kind not in KINDS[1:]:
        raise ConfigError(f"key '{model_id}.reference_data.kind': {kind!r} unknown; "
                          f"valid: {', '.join(KINDS[1:])}")
    field = "name" if kind == "library" else "path"
    if field not in raw:
        raise ConfigError(f"key '{model_id}.reference_data.{field}' missing (kind {kind})")
    name = str(raw[field]) if kind == "library" else str(Path(raw[field]).expanduser())
    return ReferenceSource(kind, name, raw.get("key"), raw.get("root"), raw.get("num_images"))


def embedded_source(dataset: str, key: str = "dataset") -> ReferenceSource:
    if dataset not in DATASETS:
        raise ConfigError(f"key '{key}': dataset {dataset!r} unknown{valid_names(dataset, DATASETS)}")
    return ReferenceSource("embedded", dataset)


def _existing(path: Path, kind: str) -> Path:
    if not path.exists():
        raise StepbenchError(f"{path}: reference data not found (model entry key 'reference_data.path', kind {kind})")
    return path


def _image_files(folder: Path) -> list[Path]:
    if not _existing(folder, "folder").is_dir():
        raise StepbenchError(f"{folder}: not a folder (model entry key 'reference_data.path', kind folder)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise StepbenchError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) for reference_data")
    return files


def load_reference_images(source: ReferenceSource) -> torch.Tensor:
    """uint8 [N, 3, H, W] images of the source, capped at num_images."""
    if not source.has_images:
        raise StepbenchError(f"{source.name}: reference_data kind npz_stats holds FID statistics only; "
                             "kid/is/prc need reference images (kind folder, npz_images or library)")
    if source.kind == "embedded":
        from harness.metrics.features import data_to_uint8_rgb

        images = data_to_uint8_rgb(load_dataset(source.name)[0])
    elif source.kind == "folder":
        images = _read_folder(_image_files(Path(source.name))[:source.num_images])
    elif source.kind == "npz_images":
        images = _read_npz_images(Path(source.name), source.key)
    else:
        images = _read_library(source)
    return images[:source.num_images] if source.num_images else images


def read_image_rgb(path: Path) -> np.ndarray:
    """uint8 [H, W, 3], decoded as clean-fid decodes files (PIL, convert('RGB'))."""
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def _read_folder(files: list[Path]) -> torch.Tensor:
    arrays = [read_image_rgb(p) for p in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise StepbenchError(f"{files[0].parent}: reference images differ in size ({sorted(shapes)[:3]}); "
                             "resize them to one size first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _read_npz_images(path: Path, key: str | None) -> torch.Tensor:
    with np.load(_existing(path, "npz_images"), allow_pickle=False) as data:
        names = [key] if key else [k for k in ("images", "samples", "arr_0", "x") if k in data.files] or data.files
        if names[0] not in data.files:
            raise StepbenchError(f"{path}: no array {names[0]!r} (model entry key 'reference_data.key'); "
                                 f"has {', '.join(data.files)}")
        array = data[names[0]]
    if array.dtype != np.uint8 or array.ndim != 4 or not (array.shape[-1] == 3 or array.shape[1] == 3):
        raise StepbenchError(f"{path}: reference images must be uint8 [N, H, W, 3] or [N, 3, H, W]; "
                             f"got {array.dtype} {list(array.shape)}")
    images = torch.from_numpy(array)
    return (images.permute(0, 3, 1, 2) if array.shape[-1] == 3 and array.shape[1] != 3 else images).contiguous()


def _read_library(source: ReferenceSource) -> torch.Tensor:
    from torch_fidelity.registry import DATASETS_REGISTRY

    if source.name not in DATASETS_REGISTRY:
        raise ConfigError(f"reference_data.name {source.name!r} unknown to torch-fidelity; "
                          f"valid: {', '.join(DATASETS_REGISTRY)}")
    # torch-fidelity's own default root (utils.prepare_input_from_id)
    root = Path(source.root).expanduser() if source.root else Path(torch.hub._get_torch_home()) / "fidelity_datasets"
    try:
        dataset = DATASETS_REGISTRY[source.name](str(root), False)  # download=False: offline by design
    except (RuntimeError, OSError) as err:
        raise StepbenchError(f"torch-fidelity dataset {source.name!r} not in its cache {root} "
                             f"({str(err).splitlines()[0]}); nothing is downloaded at run time: place it there "
                             "or set reference_data.root") from None
    count = min(len(dataset), source.num_images or len(dataset))
    return torch.stack([dataset[i] for i in range(count)]).to(torch.uint8)


def load_reference_moments(source: ReferenceSource) -> dict[str, np.ndarray]:
    """EDM's reference statistics (fid-refs/*.npz): float64 mu [D] and sigma [D, D]."""
    path = _existing(Path(source.name), source.kind)
    with np.load(path, allow_pickle=False) as data:
        if not {"mu", "sigma"} <= set(data.files):
            raise StepbenchError(f"{path}: statistics need arrays 'mu' and 'sigma' (EDM's format); "
                                 f"has {', '.join(data.files)}")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise StepbenchError(f"{path}: mu must be [D] and sigma [D, D]; got {list(mu.shape)}, {list(sigma.shape)}")
    return {"mu": mu, "sigma": sigma}
