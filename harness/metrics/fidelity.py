"""FID, KID, Inception Score and precision/recall against cached reference statistics.

The pipeline is pure functions: uint8 images -> features -> statistics -> metric. Features come from
torch-fidelity (the embedded digits-cnn, inception-v3-compat, clip-*, dinov2-*) or from clean-fid's
`clean` mode (models.yaml `fid_backend: clean-fid`). KID, IS and precision/recall are torch-fidelity's
own functions; FID's trace term is the symmetric-eigenvalue form of frechet.py, equal to
torch-fidelity's `fid_statistics_to_metric` (tests/test_fidelity.py, tests/test_inception.py) and
clean-fid's `frechet_distance` (tests/test_cleanfid.py) but seconds instead of minutes at 2048-d.
Samples are the metrics' input1, the reference data (refdata.py) input2.

Reference features and statistics are cached under `<cache_dir>/refstats/` at a path computable from
the config alone (Snakemake knows it before the extractor exists); the file stores its full key
(source and its content fingerprint, extractor, backend, weights sha256, resize mode, image count) and
is rebuilt when the key no longer matches. Every value carries a bootstrap interval over samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.defaults import DEFAULTS

from harness import accounting
from harness.errors import ConfigError, StepbenchError, valid_names
from harness.cellstore import row_chunks
from harness.files import save_npz
from harness.progress import shows_progress
from harness.metrics import cleanfid_backend
from harness.metrics.base import EvalContext, Metric, MetricValue
from harness.metrics.bootstrap import (BootstrapSpec, bootstrap_interval, bootstrap_interval_of, bootstrap_replicates,
                                      resample_indices)
from harness.metrics.features import (UInt8ImageDataset, data_to_uint8_rgb, file_sha256, get_extractor,
                                      planned_weights_path, resolve_weights)
from harness.metrics.frechet import covariance_factor, frechet_distance, sample_factor, trace_sqrt_product
from harness.metrics.refdata import (ReferenceSource, embedded_source, load_reference_images,
                                     load_reference_moments, reference_source)

# torch-fidelity's own defaults, so that results equal calculate_metrics called with defaults.
RNG_SEED = DEFAULTS["rng_seed"]
KID_SUBSETS = DEFAULTS["kid_subsets"]
KID_SUBSET_SIZE = DEFAULTS["kid_subset_size"]
ISC_SPLITS = DEFAULTS["isc_splits"]
PRC_NEIGHBORHOOD = DEFAULTS["prc_neighborhood"]
PRC_BATCH_SIZE = DEFAULTS["prc_batch_size"]
PRC_BOOTSTRAP_MAX_SAMPLES = 20000  # recall's bootstrap keeps a samples x samples distance matrix
# KID keeps the kernel matrices between all samples and reference features when they fit (1.6 GB of float64);
# beyond, the estimate makes kernels per subset and the bootstrap is left out
KID_FULL_KERNEL_ELEMENTS = 2 * 10**8
BACKENDS = ("torch-fidelity", "clean-fid")
TRACE_SQRT = "eigvalsh(B^T S1 B), S_ref = B B^T (stepbench frechet.py)"


# --- what a model's metrics are computed with ---------------------------------------------------

LAYER_METRICS = ("fid", "kid", "isc", "prc")  # models.yaml feature_layer_<metric>, torch-fidelity's kwarg names
CLEANFID_LAYERS = {"fid": "2048", "kid": "2048", "prc": "2048"}


@dataclass(frozen=True)
class FidelitySetup:
    backend: str
    extractor: str
    weights_config: str | None  # models.yaml feature_extractor_weights_path
    source: ReferenceSource
    bootstrap: BootstrapSpec
    layer_overrides: tuple[tuple[str, str], ...] = ()  # (metric, layer) from models.yaml feature_layer_<metric>

    @property
    def default_layers(self) -> dict[str, str]:
        if self.backend == "clean-fid":
            return dict(CLEANFID_LAYERS)
        return get_extractor(self.extractor).layers

    @property
    def layers(self) -> dict[str, str]:
        return {**self.default_layers, **dict(self.layer_overrides)}

    @property
    def resize(self) -> str:
        return cleanfid_backend.RESIZE if self.backend == "clean-fid" else get_extractor(self.extractor).resize

    def layer(self, metric: str) -> str:
        if metric not in self.layers:
            raise StepbenchError(f"{metric}: the {self.backend} backend has no classifier logits; "
                                 "use fid_backend torch-fidelity with an extractor that has them")
        return self.layers[metric]


def fidelity_setup(model_spec: dict, model_id: str) -> FidelitySetup:
    backend = model_spec.get("fid_backend", "torch-fidelity")
    if backend not in BACKENDS:
        raise ConfigError(f"key '{model_id}.fid_backend': {backend!r} "
                          f"unknown{valid_names(backend, BACKENDS)}")
    if backend == "clean-fid":
        extractor = cleanfid_backend.EXTRACTOR
    elif "feature_extractor" not in model_spec:
        raise ConfigError(f"key '{model_id}.feature_extractor' missing; fid/kid/is need it")
    else:
        extractor = model_spec["feature_extractor"]
        get_extractor(extractor)
    return FidelitySetup(backend, extractor, model_spec.get("feature_extractor_weights_path"),
                         reference_source(model_spec, model_id), BootstrapSpec.from_model_spec(model_spec, model_id),
                         _layer_overrides(model_spec, model_id, backend, extractor))


def _layer_overrides(model_spec: dict, model_id: str, backend: str, extractor: str) -> tuple[tuple[str, str], ...]:
    """models.yaml feature_layer_<metric>: another layer of the extractor for that metric, as torch-fidelity's
    calculate_metrics takes it (e.g. Inception's '64' or '768' for FID with fewer images than 2048)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if backend == "clean-fid":
        provided = ("2048",)  # clean-fid's network gives its pool features only
    else:
        provided = FEATURE_EXTRACTORS_REGISTRY[get_extractor(extractor).registered_name(extractor)] \
            .get_provided_features_list()
    overrides = []
    for metric in LAYER_METRICS:
        key = f"feature_layer_{metric}"
        if key not in model_spec:
            continue
        layer = str(model_spec[key])
        if backend == "clean-fid" and metric == "isc":
            raise ConfigError(f"key '{model_id}.{key}': the clean-fid backend has no classifier "
                              "logits for is; remove the key or use fid_backend torch-fidelity")
        if layer not in provided:
            raise ConfigError(f"key '{model_id}.{key}': {layer!r} is not a layer of "
                              f"{extractor!r}{valid_names(layer, provided)}")
        overrides.append((metric, layer))
    return tuple(overrides)


def default_setup(dataset: str, extractor: str) -> FidelitySetup:
    """An embedded dataset with an extractor, as `stepbench refstats --dataset --extractor` names it."""
    get_extractor(extractor)
    return FidelitySetup("torch-fidelity", extractor, None, embedded_source(dataset), BootstrapSpec())


def planned_weights(setup: FidelitySetup, cache_dir: Path) -> Path:
    if setup.backend == "clean-fid":
        return cleanfid_backend.planned_weights_file(setup.weights_config)
    return planned_weights_path(setup.extractor, cache_dir, setup.weights_config)


def weights_file(setup: FidelitySetup, cache_dir: Path) -> Path:
    if setup.backend == "clean-fid":
        return cleanfid_backend.resolve_weights_file(setup.weights_config)
    return resolve_weights(setup.extractor, cache_dir, setup.weights_config)


def backend_version(backend: str) -> str:
    if backend == "clean-fid":
        return cleanfid_backend.backend_version()
    import torch_fidelity

    return torch_fidelity.__version__


# --- pure functions: images -> features -> statistics -> metric ---------------------------------

def extract_features(images: torch.Tensor, extractor: str, weights: Path, layers: list[str],
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """uint8 [N, 3, H, W] -> {layer: float32 [N, D]} through torch-fidelity's extractor and data loop."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    spec = get_extractor(extractor)
    if spec.input_size is not None and tuple(images.shape[2:]) != spec.input_size:
        raise StepbenchError(f"feature extractor {extractor!r} takes {spec.input_size[0]}x{spec.input_size[1]} "
                             f"images (resize mode 'none'); got {images.shape[2]}x{images.shape[3]}")
    cuda = torch.device(device).type == "cuda"
    net = create_feature_extractor(spec.registered_name(extractor), layers, cuda=cuda,
                                   feature_extractor_weights_path=str(weights), verbose=False)
    # save_cpu_ram: no DataLoader worker processes; they cost more than they save on small images
    # torch-fidelity's own per-batch bar ("Processing samples") where the work is long
    verbose = shows_progress(-(-len(images) // spec.batch_size))
    return get_featuresdict_from_dataset(UInt8ImageDataset(images), net, spec.batch_size, cuda,
                                         save_cpu_ram=True, verbose=verbose)


def setup_features(images: torch.Tensor, setup: FidelitySetup, weights: Path, layers: list[str],
                   device: str = "cpu") -> dict[str, torch.Tensor]:
    if setup.backend == "clean-fid":
        return {"2048": cleanfid_backend.extract_features(images, weights, device)}
    return extract_features(images, setup.extractor, weights, layers, device)


def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean and covariance of features, in float64 (torch-fidelity's fid_features_to_statistics)."""
    x = features.to(torch.float64).numpy()
    return {"mu": np.mean(x, axis=0), "sigma": np.cov(x, rowvar=False)}


def fid_from_features(features: torch.Tensor, reference: "ReferenceStatistics", device: str = "cpu") -> float:
    """FID of sample features against the reference; only the factor A of S1 = A^T A is formed."""
    a = sample_factor(features, device)
    mu = features.to(torch.float64).mean(0).numpy()
    trace_s1 = float(a.square().sum())
    tr_sqrt = trace_sqrt_product(reference.factor.to(device), factor=a)
    diff = mu - reference.fid["mu"]
    return float(diff.dot(diff) + trace_s1 + np.trace(reference.fid["sigma"]) - 2.0 * tr_sqrt)


def frechet_statistics_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """FID between two (mu, sigma) pairs, e.g. two precomputed statistics files."""
    factor = covariance_factor(stats_2["sigma"])
    return frechet_distance(stats_1["mu"], stats_1["sigma"], stats_2["mu"], stats_2["sigma"],
                            trace_sqrt_product(factor, sigma=stats_1["sigma"]))


def kid_subset_size(num_1: int, num_2: int) -> int:
    """torch-fidelity's default subset size, shrunk to fit the smaller set (e.g. 1000 samples)."""
    return min(KID_SUBSET_SIZE, num_1, num_2)


@dataclass
class PolyKernels:
    """torch-fidelity's KID kernel k(a, b) = (a.b / dim + 1)^3 between all sample and reference features, in
    float64, computed once per cell: the subset estimator and the bootstrap only sum parts of them."""

    xx: torch.Tensor  # [N1, N1]
    xy: torch.Tensor  # [N1, N2]
    yy: torch.Tensor  # [N2, N2]

    @classmethod
    def of(cls, features_1: torch.Tensor, features_2: torch.Tensor) -> "PolyKernels":
        x, y = features_1.to(torch.float64), features_2.to(torch.float64)
        dim = x.shape[1]
        return cls(*((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (x, y), (y, y))))


def full_kernels_fit(num_1: int, num_2: int) -> bool:
    return num_1 * (num_1 + num_2) + num_2 * num_2 <= KID_FULL_KERNEL_ELEMENTS


def kid_subset_mmds(features_1: torch.Tensor, features_2: torch.Tensor, kernels: PolyKernels | None,
                    subsets: int = KID_SUBSETS, rng_seed: int = RNG_SEED) -> np.ndarray:
    """torch-fidelity's KID estimator: the unbiased MMD^2 of `subsets` random pairs of subsets, drawn as
    kid_features_to_metric draws them (one RandomState, sample subset then reference subset), in float64 where
    torch-fidelity computes in float32. With the whole kernel matrices at hand the subsets' sums come from them
    (a 0/1 row per subset, all subsets in one matrix product) instead of new kernels per subset."""
    n1, n2 = len(features_1), len(features_2)
    m = kid_subset_size(n1, n2)
    rng = np.random.RandomState(rng_seed)
    draws = [(rng.choice(n1, m, replace=False), rng.choice(n2, m, replace=False)) for _ in range(subsets)]
    if kernels is None:  # too many features for whole kernels: one subset at a time
        mmds = []
        for i1, i2 in draws:
            sub = PolyKernels.of(features_1[i1], features_2[i2])
            within = sub.xx.sum() - sub.xx.diagonal().sum() + sub.yy.sum() - sub.yy.diagonal().sum()
            mmds.append(float(within / (m * (m - 1)) - 2.0 * sub.xy.sum() / (m * m)))
        return np.array(mmds)
    pick_1, pick_2 = torch.zeros(subsets, n1, dtype=torch.float64), torch.zeros(subsets, n2, dtype=torch.float64)
    for row, (i1, i2) in enumerate(draws):
        pick_1[row, i1] = 1.0
        pick_2[row, i2] = 1.0
    # off-diagonal sums within each subset, and the cross sum between a subset pair
    within_1 = ((pick_1 @ kernels.xx) * pick_1).sum(1) - pick_1 @ kernels.xx.diagonal()
    within_2 = ((pick_2 @ kernels.yy) * pick_2).sum(1) - pick_2 @ kernels.yy.diagonal()
    across = ((pick_1 @ kernels.xy) * pick_2).sum(1)
    return ((within_1 + within_2) / (m * (m - 1)) - 2.0 * across / (m * m)).numpy()


def kernel_distance(features_1: torch.Tensor, features_2: torch.Tensor,
                    kernels: PolyKernels | None = None) -> tuple[float, float]:
    """KID (polynomial kernel MMD^2 over random subsets): mean and standard deviation over subsets."""
    if kernels is None and full_kernels_fit(len(features_1), len(features_2)):
        kernels = PolyKernels.of(features_1, features_2)
    mmds = kid_subset_mmds(features_1, features_2, kernels)
    return float(mmds.mean()), float(mmds.std())


def kid_bootstrap(kernels: PolyKernels | None, estimate: float, spec: BootstrapSpec) -> tuple[float, float] | None:
    """Interval of KID over resampled samples (see kid_replicates)."""
    replicates = kid_replicates(kernels, spec)
    return None if replicates is None else bootstrap_interval_of(replicates, spec, estimate)


def kid_replicates(kernels: PolyKernels | None, spec: BootstrapSpec) -> np.ndarray | None:
    """KID of each resample of the samples, from the cell's kernel matrices (None without them: too many
    features for whole kernels, or the bootstrap turned off).

    Re-running the 100-subset estimator per resample would cost minutes; every resample here is the unbiased
    MMD^2 of the whole resample (same kernel, same expectation as the subset mean), with pairs of copies of
    one sample left out as the unbiased estimator leaves out the diagonal. With c the resample's count of
    each sample, the sum over pairs of distinct samples is c^T K c - sum_j c_j^2 K_jj, over n^2 - sum_j c_j^2
    pairs: all resamples at once in one matrix product.
    """
    if kernels is None or spec.resamples == 0:
        return None
    n1, n2 = kernels.xy.shape
    term_yy = float((kernels.yy.sum() - kernels.yy.diagonal().sum()) / (n2 * (n2 - 1)))
    counts = torch.stack([torch.bincount(i, minlength=n1) for i in resample_indices(n1, spec)]).to(torch.float64)
    same = (counts**2).sum(1)
    within = ((counts @ kernels.xx) * counts).sum(1) - (counts**2) @ kernels.xx.diagonal()
    across = counts @ kernels.xy.sum(1)
    mmd2 = within / (n1 * n1 - same) + term_yy - 2.0 * across / (n1 * n2)
    return mmd2.numpy()


def inception_score(logits: torch.Tensor) -> tuple[float, float]:
    """IS over ISC_SPLITS shuffled splits: mean and standard deviation over splits."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    out = isc_features_to_metric(logits, splits=ISC_SPLITS, shuffle=True, rng_seed=RNG_SEED)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(features_1: torch.Tensor, features_2: torch.Tensor) -> tuple[float, float]:
    """Improved precision/recall (k-NN manifolds, Kynkäänniemi et al.), torch-fidelity's function."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    out = prc_features_to_metric(features_1, features_2, prc_neighborhood=PRC_NEIGHBORHOOD,
                                 prc_batch_size=PRC_BATCH_SIZE, save_cpu_ram=True, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def precision_recall_bootstrap(features_1: torch.Tensor, features_2: torch.Tensor, estimates: tuple[float, float],
                               spec: BootstrapSpec) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """Intervals for precision and recall over resampled samples.

    Precision is a mean of per-sample indicators against the fixed reference manifold, so it resamples
    exactly. Recall depends on the samples' own k-NN radii; a resample's duplicates would shrink them
    to zero, so radii and balls are taken over its distinct samples.
    """
    if len(features_1) > PRC_BOOTSTRAP_MAX_SAMPLES:
        return None, None
    x, y = features_1.to(torch.float32), features_2.to(torch.float32)
    k = PRC_NEIGHBORHOOD
    radius_real = torch.cdist(y, y).kthvalue(k + 1, dim=1).values
    real_to_gen = torch.cdist(y, x)  # [N2, N1]
    inside_real = (real_to_gen <= radius_real[:, None]).any(dim=0).double()  # per sample: precision indicator
    gen_to_gen = torch.cdist(x, x)

    def recall(indices: torch.Tensor) -> float:
        distinct = torch.unique(indices)
        if len(distinct) <= k:
            return float("nan")
        radius = gen_to_gen[distinct][:, distinct].kthvalue(k + 1, dim=1).values
        return float((real_to_gen[:, distinct] <= radius).any(dim=1).double().mean())

    return (bootstrap_interval(lambda i: float(inside_real[i].mean()), len(x), spec, estimates[0]),
            bootstrap_interval(recall, len(x), spec, estimates[1]))


# --- reference statistics (cached per source, extractor and backend) -----------------------------

@dataclass
class ReferenceStatistics:
    key: dict  # source, fingerprint, extractor, backend, weights_sha256, resize, layers, num_images
    features: dict[str, torch.Tensor]  # the distribution layers of every reference image (none: npz_stats)
    fid: dict[str, np.ndarray]  # mu, sigma (float64) of the FID layer
    factor: torch.Tensor  # B with B B^T = sigma: FID's trace term without a D x D eigenproblem per cell
    sha256: str  # of the key and all arrays: names these statistics in provenance


def _as_setup(source: FidelitySetup | str, extractor: str | None) -> FidelitySetup:
    return source if isinstance(source, FidelitySetup) else default_setup(source, extractor)


def reference_statistics_path(cache_dir: Path, source: FidelitySetup | str, extractor: str | None = None) -> Path:
    """Computable from the config alone: the weights' content is checked inside the file, not named here."""
    setup = _as_setup(source, extractor)
    folder = Path(cache_dir) / "refstats"
    overridden = _reference_layers(setup) != _reference_layers(setup, default=True)
    if (setup.source.kind == "embedded" and setup.backend == "torch-fidelity" and setup.weights_config is None
            and not overridden):
        return folder / f"{setup.source.name}-{setup.extractor}.npz"
    naming = {"source": setup.source.describe(), "extractor": setup.extractor, "backend": setup.backend,
              "weights": setup.weights_config}
    if overridden:  # only then: the paths of existing configs (planned by Snakemake) stay as they were
        naming["layers"] = _reference_layers(setup)
    digest = hashlib.sha256(json.dumps(naming, sort_keys=True).encode()).hexdigest()[:12]
    return folder / f"{setup.source.label()}-{setup.extractor}-{digest}.npz"


def build_reference_statistics(cache_dir: Path, source: FidelitySetup | str, extractor: str | None = None,
                               device: str = "cpu") -> Path:
    """Compute and cache the reference features and statistics unless current ones exist (idempotent)."""
    setup = _as_setup(source, extractor)
    load_reference_statistics(cache_dir, setup, device=device)
    return reference_statistics_path(cache_dir, setup)


def _reference_layers(setup: FidelitySetup, default: bool = False) -> dict[str, str]:
    """The layers a reference file holds: FID's statistics, KID's and precision/recall's features."""
    layers = setup.default_layers if default else setup.layers
    return {m: layers[m] for m in ("fid", "kid", "prc")}


def _wanted_key(setup: FidelitySetup, weights: Path) -> dict:
    return {"source": setup.source.describe(), "fingerprint": setup.source.fingerprint(),
            "extractor": setup.extractor, "backend": setup.backend, "weights_sha256": file_sha256(weights),
            "resize": setup.resize, "layers": _reference_layers(setup)}


def load_reference_statistics(cache_dir: Path, source: FidelitySetup | str, extractor: str | None = None,
                              device: str = "cpu") -> ReferenceStatistics:
    setup = _as_setup(source, extractor)
    path = reference_statistics_path(cache_dir, setup)
    weights = weights_file(setup, cache_dir)
    wanted = _wanted_key(setup, weights)
    if path.is_file():
        cached = _read_reference(path)
        if {k: cached.key.get(k) for k in wanted} == wanted:
            return cached
    with accounting.timed("metrics"):
        reference = compute_reference_statistics(setup, weights, device)
    _write_reference(path, reference)
    return reference


def compute_reference_statistics(setup: FidelitySetup, weights: Path, device: str = "cpu") -> ReferenceStatistics:
    key = {**_wanted_key(setup, weights), "backend_version": backend_version(setup.backend)}
    if not setup.source.has_images:
        fid = load_reference_moments(setup.source)
        features: dict[str, torch.Tensor] = {}
        key["num_images"] = None  # EDM's files do not record it
    else:
        images = load_reference_images(setup.source)
        layers = sorted(set(_reference_layers(setup).values()))
        features = setup_features(images, setup, weights, layers, device)
        fid = fid_statistics(features[setup.layers["fid"]])
        key["num_images"] = len(images)
    layer = features.get(setup.layers["fid"])
    factor = covariance_factor(fid["sigma"], layer)
    return ReferenceStatistics(key, features, fid, factor, _statistics_sha256(key, features, fid))


def _statistics_sha256(key: dict, features: dict[str, torch.Tensor], fid: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    arrays = {**{f"feature_{k}": v.numpy() for k, v in features.items()}, **{f"fid_{k}": v for k, v in fid.items()}}
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _write_reference(path: Path, ref: ReferenceStatistics) -> None:
    save_npz(path, key=json.dumps(ref.key), sha256=ref.sha256, factor=ref.factor.numpy(),
             **{f"feature_{k}": v.numpy() for k, v in ref.features.items()}, **{f"fid_{k}": v for k, v in ref.fid.items()})


def _read_reference(path: Path) -> ReferenceStatistics:
    try:
        with np.load(path, allow_pickle=False) as data:
            return ReferenceStatistics(
                key=json.loads(str(data["key"])),
                features={k.removeprefix("feature_"): torch.from_numpy(data[k]) for k in data.files
                          if k.startswith("feature_")},
                fid={k.removeprefix("fid_"): data[k] for k in data.files if k.startswith("fid_")},
                factor=torch.from_numpy(data["factor"]),
                sha256=str(data["sha256"]),
            )
    except (OSError, ValueError, KeyError) as err:
        raise StepbenchError(f"{path}: unreadable reference statistics ({err}); delete it to rebuild") from None


# --- metrics -------------------------------------------------------------------------------------

def setup_of(ctx: EvalContext) -> FidelitySetup:
    return ctx.memo("fidelity-setup", lambda: fidelity_setup(ctx.model_spec, ctx.cell.get("model", "?")))


def sample_features(ctx: EvalContext, setup: FidelitySetup | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Features of the cell's samples for every layer the metrics use, once per evaluate and setup (the model's
    own, or another such as fd_dinov2's), with the provenance all metrics share."""
    setup = setup or setup_of(ctx)

    def compute():
        weights = weights_file(setup, ctx.cache_dir)
        layers = sorted(set(setup.layers.values()))
        # uint8 images, converted block by block: a float64 copy of every sample at once would not be
        pixels = torch.cat([data_to_uint8_rgb(block) for block in row_chunks(ctx.samples)])
        features = setup_features(pixels, setup, weights, layers, ctx.device)
        provenance = {"extractor": setup.extractor, "weights_sha256": file_sha256(weights),
                      "weights_file": str(weights), "resize": setup.resize, "backend": setup.backend,
                      "backend_version": backend_version(setup.backend), "num_samples": len(ctx.samples)}
        return features, provenance

    return ctx.memo(f"fidelity-features:{setup.backend}:{setup.extractor}:{setup.weights_config}", compute)


def reference_statistics(ctx: EvalContext, setup: FidelitySetup | None = None) -> tuple[ReferenceStatistics, dict]:
    """The model's (or `setup`'s) cached reference statistics and their provenance, once per evaluate."""
    setup = setup or setup_of(ctx)

    def compute():
        ref = load_reference_statistics(ctx.cache_dir, setup, device=ctx.device)
        return ref, {**setup.source.describe(), "dataset": setup.source.name, "num_images": ref.key["num_images"],
                     "stats_sha256": ref.sha256}

    return ctx.memo(f"fidelity-reference:{reference_statistics_path(ctx.cache_dir, setup)}", compute)


def _reference_features(reference: ReferenceStatistics, layer: str, metric: str) -> torch.Tensor:
    if layer not in reference.features:
        raise StepbenchError(f"{metric}: the reference data are precomputed FID statistics (npz_stats); "
                             f"{metric} needs reference images (reference_data kind folder, npz_images or library)")
    return reference.features[layer]


def _value(value: float, interval, provenance: dict, replicates: np.ndarray | None = None,
           spec: BootstrapSpec | None = None) -> MetricValue:
    low, high = interval if interval is not None else (None, None)
    return MetricValue(value, low, high, provenance, replicates, spec.seed if spec is not None else None)


def _bootstrap(statistic, num: int, spec: BootstrapSpec, estimate: float):
    """(interval, replicates) of statistic over the spec's resamples; (None, None) when turned off."""
    replicates = bootstrap_replicates(statistic, num, spec)
    return (None, None) if replicates is None else (bootstrap_interval_of(replicates, spec, estimate), replicates)


def frechet_value(ctx: EvalContext, setup: FidelitySetup) -> MetricValue:
    """The Fréchet distance of `setup`'s features of the samples to its reference statistics, with its bootstrap."""
    (features, provenance), (reference, ref_provenance) = sample_features(ctx, setup), reference_statistics(ctx, setup)
    samples = features[setup.layer("fid")]
    if samples.shape[1] != len(reference.fid["mu"]):
        raise StepbenchError(f"{ref_provenance.get('name', 'the reference data')}: its statistics are "
                             f"{len(reference.fid['mu'])}-d but {setup.extractor}'s {setup.layer('fid')!r} features are "
                             f"{samples.shape[1]}-d (statistics of another extractor?)")
    value = fid_from_features(samples, reference, ctx.device)
    interval, replicates = _bootstrap(lambda i: fid_from_features(samples[i], reference, ctx.device),
                                      len(samples), setup.bootstrap, value)
    if interval is not None:  # a distance: the corrected lower end cannot go below 0
        interval = (max(interval[0], 0.0), interval[1])
    return _value(value, interval, {**provenance, "feature_layer": setup.layer("fid"), "reference": ref_provenance,
                                    "trace_sqrt": TRACE_SQRT, "bootstrap": setup.bootstrap.provenance()},
                  replicates, setup.bootstrap)


class FID(Metric):
    """Fréchet distance between Gaussian fits of sample and reference features (float64)."""

    name = "fid"

    def compute(self, ctx: EvalContext) -> MetricValue:
        return frechet_value(ctx, setup_of(ctx))


class KID(Metric):
    """Kernel distance (unbiased MMD^2, cubic polynomial kernel), mean over random subsets."""

    name = "kid"

    def compute(self, ctx: EvalContext) -> MetricValue:
        (features, provenance), (reference, ref_provenance) = sample_features(ctx), reference_statistics(ctx)
        setup = setup_of(ctx)
        layer = setup.layer("kid")
        samples, ref = features[layer], _reference_features(reference, layer, "kid")
        kernels = PolyKernels.of(samples, ref) if full_kernels_fit(len(samples), len(ref)) else None
        mean, std = kernel_distance(samples, ref, kernels)
        replicates = kid_replicates(kernels, setup.bootstrap)
        interval = None if replicates is None else bootstrap_interval_of(replicates, setup.bootstrap, mean)
        return _value(mean, interval, {
            **provenance, "feature_layer": layer, "reference": ref_provenance, "std": std, "subsets": KID_SUBSETS,
            "subset_size": kid_subset_size(len(samples), len(ref)), "rng_seed": RNG_SEED,
            "estimator": "torch-fidelity's kid_features_to_metric (same subsets), summed in float64",
            "bootstrap": {**setup.bootstrap.provenance(), "statistic": "unbiased MMD^2 of each whole resample"}},
            replicates, setup.bootstrap)


class InceptionScore(Metric):
    """exp E_x[KL(p(y|x) || p(y))] of the extractor's class posterior (1 to #classes), mean over splits."""

    name = "is"
    higher_is_better = True

    def compute(self, ctx: EvalContext) -> MetricValue:
        setup = setup_of(ctx)
        layer = setup.layer("isc")
        features, provenance = sample_features(ctx)
        logits = features[layer]
        mean, std = inception_score(logits)
        interval, replicates = _bootstrap(lambda i: inception_score(logits[i])[0], len(logits), setup.bootstrap, mean)
        return _value(mean, interval, {**provenance, "feature_layer": layer, "std": std, "splits": ISC_SPLITS,
                                       "rng_seed": RNG_SEED, "bootstrap": setup.bootstrap.provenance()},
                      replicates, setup.bootstrap)


def _precision_recall(ctx: EvalContext) -> dict:
    (features, provenance), (reference, ref_provenance) = sample_features(ctx), reference_statistics(ctx)
    setup = setup_of(ctx)
    layer = setup.layer("prc")

    def compute():
        samples, ref = features[layer], _reference_features(reference, layer, "precision/recall")
        precision, recall = precision_recall(samples, ref)
        intervals = precision_recall_bootstrap(samples, ref, (precision, recall), setup.bootstrap)
        common = {**provenance, "feature_layer": layer, "reference": ref_provenance, "neighborhood": PRC_NEIGHBORHOOD,
                  "estimator": "torch-fidelity prc_features_to_metric", "bootstrap": setup.bootstrap.provenance()}
        return {"precision": _value(precision, intervals[0], common),
                "recall": _value(recall, intervals[1], {**common, "bootstrap_note": "radii over distinct resampled samples"})}

    return ctx.memo("fidelity-prc", compute)


class Precision(Metric):
    """Fraction of samples inside the reference's k-NN manifold (fidelity)."""

    name = "precision"
    higher_is_better = True

    def compute(self, ctx: EvalContext) -> MetricValue:
        return _precision_recall(ctx)["precision"]


class Recall(Metric):
    """Fraction of reference images inside the samples' k-NN manifold (coverage)."""

    name = "recall"
    higher_is_better = True

    def compute(self, ctx: EvalContext) -> MetricValue:
        return _precision_recall(ctx)["recall"]


class ClassAccuracy(Metric):
    """Condition adherence of a class-conditional model: the share of samples the extractor's classifier (the
    digits-cnn's logits) assigns to the label they were drawn for; the class-conditional counterpart of CLIP
    score. A bootstrap over samples gives its interval."""

    name = "class_acc"
    higher_is_better = True

    def compute(self, ctx: EvalContext) -> MetricValue:
        if ctx.labels is None:
            raise StepbenchError("class_acc needs the samples' labels: a class-conditional model's cell")
        setup = setup_of(ctx)
        layer = setup.layer("isc")
        features, provenance = sample_features(ctx)
        correct = (features[layer].argmax(1).numpy() == np.asarray(ctx.labels)).astype(np.float64)
        value = float(correct.mean())
        interval, replicates = _bootstrap(lambda i: float(correct[i.numpy()].mean()), len(correct), setup.bootstrap,
                                          value)
        return _value(value, interval, {**provenance, "feature_layer": layer, "classifier": f"{setup.extractor} argmax",
                                        "bootstrap": setup.bootstrap.provenance()}, replicates, setup.bootstrap)
