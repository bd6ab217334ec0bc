"""clean-fid's `clean` mode as a feature backend: PIL bicubic resize to 299x299 in float, then the
StyleGAN2-ADA Inception torchscript through clean-fid's own InceptionV3W wrapper.

clean-fid downloads `inception-2015-12-05.pt` into a hard-coded folder (/tmp on Linux and macOS, the
current folder on Windows: cleanfid.features.feature_extractor). stepbench never downloads: it loads
that file from models.yaml `feature_extractor_weights_path` (the file, or a folder holding it) or from
clean-fid's folder, and says where it looked when the file is missing.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch

from harness.errors import ConfigError, StepbenchError
from harness.progress import batch_progress

EXTRACTOR = "clean-fid-inception"  # the name provenance and cache keys use for clean-fid's network
WEIGHTS_FILENAME = "inception-2015-12-05.pt"  # the name InceptionV3W loads
RESIZE = "clean-fid clean: PIL bicubic in float32 to 299x299"
BATCH_SIZE = 32  # clean-fid's compute_fid default; features do not depend on it beyond float round-off


def default_weights_file() -> Path:
    """Where cleanfid.features.feature_extractor keeps its download."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / WEIGHTS_FILENAME


def planned_weights_file(configured: str | None) -> Path:
    if configured is None:
        return default_weights_file()
    path = Path(configured).expanduser()
    if path.suffix != ".pt":  # a folder, as InceptionV3W takes it
        path = path / WEIGHTS_FILENAME
    if path.name != WEIGHTS_FILENAME:
        raise ConfigError(f"key 'feature_extractor_weights_path': clean-fid loads a file named "
                          f"{WEIGHTS_FILENAME}; got {path.name}")
    return path


def resolve_weights_file(configured: str | None) -> Path:
    path = planned_weights_file(configured)
    if not path.is_file():
        where = ("the model entry's key 'feature_extractor_weights_path'" if configured is not None else
                 "clean-fid's download folder; nothing is downloaded at run time")
        raise StepbenchError(f"clean-fid Inception weights not found: looked for {path} ({where}); "
                             f"put {WEIGHTS_FILENAME} there or set 'feature_extractor_weights_path'")
    return path


def load_model(weights_file: Path, device: str = "cpu") -> torch.nn.Module:
    """clean-fid's InceptionV3W on the given file (download=False: it only loads)."""
    from cleanfid.inception_torchscript import InceptionV3W

    try:
        model = InceptionV3W(str(weights_file.parent), download=False, resize_inside=False)
    except (RuntimeError, ValueError) as err:
        raise StepbenchError(f"{weights_file}: not a clean-fid Inception torchscript ({type(err).__name__})") from None
    return model.to(device).eval()


def resize_clean(image_hwc: np.ndarray) -> torch.Tensor:
    """One uint8 [H, W, 3] image -> float32 [3, 299, 299] in 0..255, exactly as clean-fid's ResizeDataset."""
    from cleanfid.resize import build_resizer

    resized = build_resizer("clean")(image_hwc)  # float32 [299, 299, 3]
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def extract_features(images: torch.Tensor, weights_file: Path | None, device: str = "cpu",
                     batch_size: int = BATCH_SIZE, model: torch.nn.Module | None = None) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, D] clean-mode features: D = 2048 from Inception on `weights_file`,
    or those of `model`, clean-fid's `custom_feat_extractor` contract (float [B, 3, 299, 299] in 0..255
    -> [B, D]), so that the same network can be handed to compute_fid and here."""
    if model is None:
        if weights_file is None:
            raise ValueError("extract_features needs weights_file or model")
        model = load_model(weights_file, device)
    hwc = images.permute(0, 2, 3, 1).numpy()
    out = []
    starts = range(0, len(hwc), batch_size)
    progress = batch_progress(len(starts), "features (clean-fid)")
    with torch.no_grad():
        for start in starts:
            batch = torch.stack([resize_clean(image) for image in hwc[start:start + batch_size]])
            out.append(model(batch.to(device)).cpu())
            progress.update(1)
    progress.close()
    return torch.cat(out).to(torch.float32)


def backend_version() -> str:
    from importlib.metadata import version

    return version("clean-fid")
