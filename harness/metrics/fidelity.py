"""FID, KID and Inception Score through torch-fidelity, against cached reference statistics.

The pipeline is torch-fidelity's own, as pure functions: uint8 images -> features -> statistics ->
metric. Every step calls torch-fidelity, so a cell's numbers equal `torch_fidelity.calculate_metrics`
on the same images with the same extractor (tests/test_fidelity.py checks it). Samples are the
metrics' input1, the model's reference dataset (models.yaml `dataset`) input2.

Reference features and statistics are computed once per (dataset, extractor) and cached under
`<cache_dir>/refstats/`; the file records its key (dataset, extractor, weights sha256, resize mode,
image count) and is rebuilt when the extractor's weights no longer match.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from harness.datasets import DATASETS, load_dataset
from harness.errors import ConfigError, StepbenchError
from harness.metrics.base import EvalContext, Metric, MetricValue
from harness.metrics.features import (UInt8ImageDataset, build_extractor, data_to_uint8_rgb, file_sha256,
                                      get_extractor)

FEATURE_BATCH_SIZE = 500  # images per extractor call
# torch-fidelity's own defaults, so that results equal calculate_metrics called with defaults.
RNG_SEED = DEFAULTS["rng_seed"]
KID_SUBSETS = DEFAULTS["kid_subsets"]
KID_SUBSET_SIZE = DEFAULTS["kid_subset_size"]
ISC_SPLITS = DEFAULTS["isc_splits"]


# --- pure functions: images -> features -> statistics -> metric ---------------------------------

def extract_features(images: torch.Tensor, extractor: str, weights: Path, layers: list[str],
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """uint8 [N, 3, H, W] -> {layer: float32 [N, D]} through torch-fidelity's extractor and data loop."""
    spec = get_extractor(extractor)
    if spec.resize == "none" and tuple(images.shape[2:]) != spec.input_size:
        raise StepbenchError(f"feature extractor {extractor!r} takes {spec.input_size[0]}x{spec.input_size[1]} "
                             f"images (resize mode 'none'); got {images.shape[2]}x{images.shape[3]}")
    cuda = torch.device(device).type == "cuda"
    net = create_feature_extractor(extractor, layers, cuda=cuda, feature_extractor_weights_path=str(weights),
                                   verbose=False)
    # save_cpu_ram: no DataLoader worker processes; they cost more than they save on small images
    return get_featuresdict_from_dataset(UInt8ImageDataset(images), net, FEATURE_BATCH_SIZE, cuda,
                                         save_cpu_ram=True, verbose=False)


def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean and covariance of features, in float64."""
    return fid_features_to_statistics(features.to(torch.float64))


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    return fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID]


def kid_subset_size(num_1: int, num_2: int) -> int:
    """torch-fidelity's default subset size, shrunk to fit the smaller set (e.g. 1000 samples)."""
    return min(KID_SUBSET_SIZE, num_1, num_2)


def kernel_distance(features_1: torch.Tensor, features_2: torch.Tensor) -> tuple[float, float]:
    """KID (polynomial kernel MMD^2 over random subsets): mean and standard deviation over subsets."""
    out = kid_features_to_metric(features_1, features_2, kid_subsets=KID_SUBSETS,
                                 kid_subset_size=kid_subset_size(len(features_1), len(features_2)),
                                 rng_seed=RNG_SEED, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def inception_score(logits: torch.Tensor) -> tuple[float, float]:
    """IS over ISC_SPLITS shuffled splits: mean and standard deviation over splits."""
    out = isc_features_to_metric(logits, splits=ISC_SPLITS, shuffle=True, rng_seed=RNG_SEED)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


# --- reference statistics (cached per dataset and extractor) ------------------------------------

@dataclass
class ReferenceStatistics:
    key: dict  # dataset, extractor, weights_sha256, resize, num_images
    features: dict[str, torch.Tensor]  # the FID/KID layers of every reference image
    fid: dict[str, np.ndarray]  # mu, sigma (float64) of the FID layer
    sha256: str  # of the key and all arrays: names these statistics in provenance


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r} unknown (models.yaml key 'dataset'); valid: {', '.join(DATASETS)}")


def reference_statistics_path(cache_dir: Path, dataset: str, extractor: str) -> Path:
    _check_dataset(dataset)
    get_extractor(extractor)
    return Path(cache_dir) / "refstats" / f"{dataset}-{extractor}.npz"


def build_reference_statistics(cache_dir: Path, dataset: str, extractor: str) -> Path:
    """Compute and cache the reference features and statistics unless current ones exist (idempotent)."""
    load_reference_statistics(cache_dir, dataset, extractor)
    return reference_statistics_path(cache_dir, dataset, extractor)


def load_reference_statistics(cache_dir: Path, dataset: str, extractor: str,
                              device: str = "cpu") -> ReferenceStatistics:
    path = reference_statistics_path(cache_dir, dataset, extractor)
    weights = build_extractor(extractor, cache_dir)
    wanted = {"dataset": dataset, "extractor": extractor, "weights_sha256": file_sha256(weights),
              "resize": get_extractor(extractor).resize}
    if path.is_file():
        cached = _read_reference(path)
        # num_images is not checked: it is fixed by the embedded dataset, and reading it would mean
        # loading the dataset on every evaluate
        if {k: cached.key.get(k) for k in wanted} == wanted:
            return cached
    reference = compute_reference_statistics(dataset, extractor, weights, device)
    _write_reference(path, reference)
    return reference


def compute_reference_statistics(dataset: str, extractor: str, weights: Path,
                                 device: str = "cpu") -> ReferenceStatistics:
    spec = get_extractor(extractor)
    images, _ = load_dataset(dataset)
    layers = sorted({spec.layers["fid"], spec.layers["kid"]})
    features = extract_features(data_to_uint8_rgb(images), extractor, weights, layers, device)
    key = {"dataset": dataset, "extractor": extractor, "weights_sha256": file_sha256(weights),
           "resize": spec.resize, "num_images": len(images)}
    fid = fid_statistics(features[spec.layers["fid"]])
    return ReferenceStatistics(key, features, fid, _statistics_sha256(key, features, fid))


def _statistics_sha256(key: dict, features: dict[str, torch.Tensor], fid: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    arrays = {**{f"feature_{k}": v.numpy() for k, v in features.items()}, **{f"fid_{k}": v for k, v in fid.items()}}
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _write_reference(path: Path, ref: ReferenceStatistics) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: parallel jobs may race here
    with open(tmp, "wb") as f:
        np.savez(f, key=json.dumps(ref.key), sha256=ref.sha256,
                 **{f"feature_{k}": v.numpy() for k, v in ref.features.items()},
                 **{f"fid_{k}": v for k, v in ref.fid.items()})
    os.replace(tmp, path)


def _read_reference(path: Path) -> ReferenceStatistics:
    try:
        with np.load(path, allow_pickle=False) as data:
            return ReferenceStatistics(
                key=json.loads(str(data["key"])),
                features={k.removeprefix("feature_"): torch.from_numpy(data[k]) for k in data.files
                          if k.startswith("feature_")},
                fid={k.removeprefix("fid_"): data[k] for k in data.files if k.startswith("fid_")},
                sha256=str(data["sha256"]),
            )
    except (OSError, ValueError, KeyError) as err:
        raise StepbenchError(f"{path}: unreadable reference statistics ({err}); delete it to rebuild") from None


# --- metrics -------------------------------------------------------------------------------------

def _spec_key(ctx: EvalContext, key: str) -> str:
    if key not in ctx.model_spec:
        raise ConfigError(f"models.yaml: key '{ctx.cell['model']}.{key}' missing; fid/kid/is need it")
    return ctx.model_spec[key]


def sample_features(ctx: EvalContext) -> tuple[dict[str, torch.Tensor], dict]:
    """Features of the cell's samples for every layer the metrics use, once per evaluate, with the
    provenance all three metrics share."""
    extractor = _spec_key(ctx, "feature_extractor")

    def compute():
        spec = get_extractor(extractor)
        weights = build_extractor(extractor, ctx.cache_dir)
        layers = sorted(set(spec.layers.values()))
        features = extract_features(data_to_uint8_rgb(ctx.samples), extractor, weights, layers, ctx.device)
        provenance = {"extractor": extractor, "weights_sha256": file_sha256(weights), "resize": spec.resize,
                      "backend": "torch-fidelity", "backend_version": torch_fidelity.__version__,
                      "num_samples": len(ctx.samples)}
        return features, provenance

    return ctx.memo(f"fidelity-features:{extractor}", compute)


def reference_statistics(ctx: EvalContext) -> tuple[ReferenceStatistics, dict]:
    """The model's cached reference statistics and their provenance, once per evaluate."""
    dataset, extractor = _spec_key(ctx, "dataset"), _spec_key(ctx, "feature_extractor")

    def compute():
        ref = load_reference_statistics(ctx.cache_dir, dataset, extractor, ctx.device)
        return ref, {"dataset": dataset, "num_images": ref.key["num_images"], "stats_sha256": ref.sha256}

    return ctx.memo(f"fidelity-reference:{dataset}:{extractor}", compute)


def _layer(ctx: EvalContext, metric: str) -> str:
    return get_extractor(_spec_key(ctx, "feature_extractor")).layers[metric]


class FID(Metric):
    """Fréchet distance between Gaussian fits of sample and reference features (float64)."""

    name = "fid"

    def compute(self, ctx: EvalContext) -> MetricValue:
        (features, provenance), (reference, ref_provenance) = sample_features(ctx), reference_statistics(ctx)
        layer = _layer(ctx, "fid")
        value = frechet_distance(fid_statistics(features[layer]), reference.fid)
        return MetricValue(value, provenance={**provenance, "feature_layer": layer, "reference": ref_provenance})


class KID(Metric):
    """Kernel distance (unbiased MMD^2, cubic polynomial kernel), mean over random subsets."""

    name = "kid"

    def compute(self, ctx: EvalContext) -> MetricValue:
        (features, provenance), (reference, ref_provenance) = sample_features(ctx), reference_statistics(ctx)
        layer = _layer(ctx, "kid")
        samples, ref = features[layer], reference.features[layer]
        mean, std = kernel_distance(samples, ref)
        return MetricValue(mean, provenance={
            **provenance, "feature_layer": layer, "reference": ref_provenance, "std": std, "subsets": KID_SUBSETS,
            "subset_size": kid_subset_size(len(samples), len(ref)), "rng_seed": RNG_SEED})


class InceptionScore(Metric):
    """exp E_x[KL(p(y|x) || p(y))] of the extractor's class posterior (1 to #classes), mean over splits."""

    name = "is"
    higher_is_better = True

    def compute(self, ctx: EvalContext) -> MetricValue:
        features, provenance = sample_features(ctx)
        layer = _layer(ctx, "isc")
        mean, std = inception_score(features[layer])
        return MetricValue(mean, provenance={**provenance, "feature_layer": layer, "std": std,
                                             "splits": ISC_SPLITS, "rng_seed": RNG_SEED})
