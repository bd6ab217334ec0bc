"""Embedded feature extractors for FID/KID/IS, registered with torch-fidelity.

`digits-cnn` is a tiny classifier of scikit-learn's 8x8 digits, trained here deterministically on CPU
in a few seconds and cached, so image metrics work offline. It follows torch-fidelity's conventions:
input uint8 [N, 3, H, W] in 0..255, output a tuple of the requested feature layers. Samples and the
reference dataset reach it through the same `data_to_uint8_rgb`, so quantisation treats both alike.

EXTRACTORS maps a name to what the metrics need to know about it: the embedded digits-cnn and
torch-fidelity's own extractors (inception-v3-compat, clip-*, dinov2-*), whose weights come from a
configured local path or torch-fidelity's download cache, never from the network at run time. DINOv2's
network is built by harness.metrics.dinov2 (torch-fidelity's own builds it only through torch.hub).
"""

from __future__ import annotations

import hashlib
import io
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from harness import accounting
from harness.datasets import load_dataset
from harness.files import atomic_path
from harness.errors import ConfigError, StepbenchError

IMAGE_DATA_RANGE = (-1.0, 1.0)  # data space of the embedded image models (the diffusers convention)


# --- images: data space -> torch-fidelity's uint8 RGB ------------------------------------------------

def data_to_uint8_rgb(images, data_range: tuple[float, float] = IMAGE_DATA_RANGE) -> torch.Tensor:
    """[S, C, H, W] float in `data_range` -> uint8 [S, 3, H, W]: round((x - lo) / (hi - lo) * 255), clipped.

    Grey images (C = 1) are repeated to three channels, as torch-fidelity expects RGB.
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise StepbenchError(f"image metrics need samples of shape [S, 1 or 3, H, W]; got {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise StepbenchError("image metrics got non-finite sample values (a diverged cell should say so)")
    lo, hi = data_range
    pixels = torch.round((x - lo) / (hi - lo) * 255.0).clamp_(0, 255).to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels


class UInt8ImageDataset(Dataset):
    """A fixed set of uint8 [N, 3, H, W] images, in the form torch-fidelity accepts as input1/input2."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W] images, got {images.dtype} {list(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


# --- digits-cnn -----------------------------------------------------------------------------------

DIGITS_SEED = 0
DIGITS_TRAIN_STEPS = 100
DIGITS_LR = 3e-3
DIGITS_WEIGHT_DECAY = 1e-4
DIGITS_HOLDOUT_EVERY = 5  # every 5th image is held out, to check the classifier is worth its features


def digits_split(num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of the digits set used to train digits-cnn."""
    index = np.arange(num_images)
    held_out = index % DIGITS_HOLDOUT_EVERY == 0
    return index[~held_out], index[held_out]


def uint8_to_grey_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 1, H, W] in [-1, 1]; training and extraction both go through it."""
    return pixels.to(torch.float32).mean(dim=1, keepdim=True) / 127.5 - 1.0


class DigitsCNN(nn.Module):
    FEATURE_DIM = 64
    NUM_CLASSES = 10

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc_feat = nn.Linear(32 * 4 * 4, self.FEATURE_DIM)
        self.fc_logits = nn.Linear(self.FEATURE_DIM, self.NUM_CLASSES)
        # Fixed after training so features have unit RMS: KID's kernel (x.y / dim + 1)^3 is evaluated
        # in float32 by torch-fidelity and loses all precision on features of norm ~100.
        self.register_buffer("feat_scale", torch.ones(()))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float [N, 1, 8, 8] in [-1, 1] -> (penultimate features [N, 64], logits [N, 10]).

        The features are taken before the ReLU: a quarter of the units are dead after it, which would
        leave FID a singular covariance.
        """
        h = F.relu(self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 2)))  # pool early: 4x cheaper to train
        pre_activation = self.fc_feat(h.flatten(1))
        return pre_activation * self.feat_scale, self.fc_logits(F.relu(pre_activation))


@contextmanager
def _deterministic_cpu():
    """One thread and deterministic kernels while training, so the weights do not depend on the core
    count; the caller's settings and global RNG are restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DIGITS_SEED)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def train_digits_cnn() -> dict:
    """Train digits-cnn full-batch on the training split; returns the checkpoint (state dict + recipe)."""
    images, labels = load_dataset("digits")
    x = uint8_to_grey_unit(data_to_uint8_rgb(images))
    y = torch.from_numpy(labels)
    train, held_out = (torch.from_numpy(i) for i in digits_split(len(x)))
    with _deterministic_cpu():
        net = DigitsCNN()
        optimizer = torch.optim.AdamW(net.parameters(), lr=DIGITS_LR, weight_decay=DIGITS_WEIGHT_DECAY)
        for _ in range(DIGITS_TRAIN_STEPS):
            optimizer.zero_grad()
            F.cross_entropy(net.features_and_logits(x[train])[1], y[train]).backward()
            optimizer.step()
        with torch.no_grad():
            feat = net.features_and_logits(x[train])[0]
            net.feat_scale.fill_(feat.square().mean().rsqrt())
            accuracy = (net.features_and_logits(x[held_out])[1].argmax(1) == y[held_out]).double().mean().item()
    recipe = {"arch": "DigitsCNN", "dataset": "digits", "seed": DIGITS_SEED, "steps": DIGITS_TRAIN_STEPS,
              "lr": DIGITS_LR, "weight_decay": DIGITS_WEIGHT_DECAY, "holdout_every": DIGITS_HOLDOUT_EVERY,
              "holdout_accuracy": accuracy,
              "torch": str(torch.__version__)}  # str: a TorchVersion would not load with weights_only
    return {"state_dict": net.state_dict(), "recipe": recipe}


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StepbenchError(f"{path}: feature extractor weights not found (build them: stepbench extractor NAME)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one, not torch's traceback
        raise StepbenchError(f"{path}: not a readable checkpoint ({type(err).__name__}); "
                             "delete it to rebuild") from None


class FeatureExtractorDigitsCNN(FeatureExtractorBase):
    """torch-fidelity extractor: 'feat' (64-d penultimate layer, unit RMS) for FID/KID, 'logits' for IS."""

    INPUT_SIZE = (8, 8)

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise StepbenchError(f"feature extractor {name!r} needs feature_extractor_weights_path "
                                 f"(build it: stepbench extractor {name})")
        self.net = DigitsCNN()
        self.net.load_state_dict(load_checkpoint(feature_extractor_weights_path)["state_dict"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.INPUT_SIZE:
            raise ValueError(f"{self.name} takes uint8 [N, 3, 8, 8] images; got {x.dtype} {list(x.shape)}")
        feat, logits = self.net.features_and_logits(uint8_to_grey_unit(x))
        provided = {"feat": feat, "logits": logits}
        return tuple(provided[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "feat", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


# --- registry: embedded extractors and torch-fidelity's own ------------------------------------------

TF_RESIZE = "torch-fidelity bilinear (TF1.x-compatible) to {size}"  # interpolate_bilinear_2d_like_tensorflow1x


@dataclass(frozen=True)
class ExtractorSpec:
    resize: str  # how images reach the extractor's input size; "none": they must already have it
    input_size: tuple[int, int] | None  # None: any size (the extractor resizes)
    layers: dict[str, str]  # torch-fidelity metric key (fid, kid, isc, prc) -> feature layer
    fidelity_class: type[FeatureExtractorBase] | None = None  # stepbench's: registered with torch-fidelity
    build: Callable[[], dict] | None = None  # embedded: -> checkpoint to cache when the weights are missing
    library_file: Callable[[], Path] | None = None  # torch-fidelity's own: where its download is cached
    batch_size: int = 500  # images per extractor call (Inception at 299x299 needs GBs per 500)
    fidelity_name: str | None = None  # the name registered with torch-fidelity, when it is not the extractor's

    def registered_name(self, name: str) -> str:
        return self.fidelity_name or name


def _hub_checkpoint(filename: str) -> Callable[[], Path]:
    """torch.hub's download cache ($TORCH_HOME/hub/checkpoints), where torch-fidelity's loaders look."""
    return lambda: Path(torch.hub.get_dir()) / "checkpoints" / filename


def _library_extractors() -> dict[str, ExtractorSpec]:
    from torch_fidelity.feature_extractor_clip import MODEL_METADATA as CLIP_MODELS
    from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA as DINO_MODELS
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    from harness.metrics.dinov2 import FIDELITY_PREFIX, FeatureExtractorDinoV2File, weights_filename

    specs = {"inception-v3-compat": ExtractorSpec(
        resize=TF_RESIZE.format(size="299x299"), input_size=None,
        layers={"fid": "2048", "kid": "2048", "prc": "2048", "isc": "logits_unbiased"},
        library_file=_hub_checkpoint(URL_INCEPTION_V3.rsplit("/", 1)[1]), batch_size=64)}
    for name, meta in CLIP_MODELS.items():
        specs[name] = ExtractorSpec(resize=TF_RESIZE.format(size="the model's input resolution"), input_size=None,
                                    layers={"fid": "clip", "kid": "clip", "prc": "clip", "isc": "clip"},
                                    library_file=_hub_checkpoint(f"{name}-{meta['hash']}.pt"), batch_size=64)
    for name in DINO_MODELS:  # torch-fidelity's class with the network from the file, not from torch.hub
        specs[name] = ExtractorSpec(resize=TF_RESIZE.format(size="224x224"), input_size=None,
                                    layers={"fid": "dinov2", "kid": "dinov2", "prc": "dinov2", "isc": "dinov2"},
                                    library_file=_hub_checkpoint(weights_filename(name)), batch_size=64,
                                    fidelity_class=FeatureExtractorDinoV2File, fidelity_name=FIDELITY_PREFIX + name)
    return specs


EXTRACTORS: dict[str, ExtractorSpec] = {
    "digits-cnn": ExtractorSpec(resize="none", input_size=FeatureExtractorDigitsCNN.INPUT_SIZE,
                                layers={"fid": "feat", "kid": "feat", "prc": "feat", "isc": "logits"},
                                fidelity_class=FeatureExtractorDigitsCNN, build=train_digits_cnn),
    **_library_extractors(),
}

for _name, _spec in EXTRACTORS.items():
    # torch-fidelity refuses a second registration of a name (module reloads, several entry points)
    if _spec.fidelity_class is not None and _spec.registered_name(_name) not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(_spec.registered_name(_name), _spec.fidelity_class)


def get_extractor(name: str) -> ExtractorSpec:
    if name not in EXTRACTORS:
        raise ConfigError(f"feature extractor {name!r} unknown (model entry key 'feature_extractor'); "
                          f"valid: {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]


def weights_path(cache_dir: Path, name: str) -> Path:
    """Where an embedded extractor's weights are cached (built by `stepbench extractor NAME`)."""
    if get_extractor(name).build is None:
        raise ConfigError(f"feature extractor {name!r} is torch-fidelity's own, not built by stepbench; "
                          "its weights come from torch-fidelity's cache or 'feature_extractor_weights_path'")
    return Path(cache_dir) / "extractors" / f"{name}.pt"


def planned_weights_path(name: str, cache_dir: Path, configured: str | None) -> Path:
    """The weights file an extractor will load, computable before it exists (Snakemake inputs)."""
    spec = get_extractor(name)
    if configured is not None:
        return Path(configured).expanduser()
    return weights_path(cache_dir, name) if spec.build is not None else spec.library_file()


def resolve_weights(name: str, cache_dir: Path, configured: str | None) -> Path:
    """The extractor's weights file: the configured one, the embedded one (built if missing), or the
    library's cached download. Nothing is downloaded: a missing file is one line saying where we looked."""
    spec = get_extractor(name)
    path = planned_weights_path(name, cache_dir, configured)
    if configured is None and spec.build is not None:
        return build_extractor(name, cache_dir)
    if not path.is_file():
        where = ("the model entry's key 'feature_extractor_weights_path'" if configured is not None else
                 "torch-fidelity's download cache under torch.hub.get_dir(); nothing is downloaded at run time")
        hint = "" if configured is not None else \
            "; put the file there or set the model entry's key 'feature_extractor_weights_path'"
        raise StepbenchError(f"{name} weights not found: looked for {path} ({where}){hint}")
    return path


def build_extractor(name: str, cache_dir: Path) -> Path:
    """Path of the extractor's cached weights, training/building them first if missing (idempotent)."""
    spec = get_extractor(name)
    path = weights_path(cache_dir, name)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # torch.save names the archive inside after the file it writes; through a buffer it is always
        # "archive", so the bytes, and the sha256 in provenance, do not depend on the temporary name
        buffer = io.BytesIO()
        with accounting.timed("training"):
            weights = spec.build()
        torch.save(weights, buffer)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): Inception's 100 MB are hashed once per process."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
