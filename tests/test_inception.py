"""inception-v3-compat through the configured weights path, offline: a randomly initialised Inception
built here with torch-fidelity's own class stands in for the real weights file."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from harness.errors import ConfigError, StepbenchError
from harness.metrics import fidelity
from harness.metrics.base import EvalContext
from harness.metrics.features import UInt8ImageDataset, data_to_uint8_rgb, file_sha256, resolve_weights
from harness.metrics.fidelity import FID, KID, InceptionScore, Precision, Recall

NUM = 12  # images per side: Inception at 299x299 costs ~0.2 s an image on this CPU


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """A state dict for torch-fidelity's FeatureExtractorInceptionV3, He-initialised so activations
    neither vanish nor explode through ~90 layers (BatchNorm is the identity at its initial stats)."""
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: None), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0.0, math.sqrt(2.0 / module.weight[0].numel()), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
    torch.save(net.state_dict(), path)
    return path


def images(seed: int, num: int = NUM, shift: float = 0.0) -> np.ndarray:
    """Smooth random 32x32 colour images in [-1, 1]; `shift` moves the distribution."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((num, 3, 4, 4))
    x = torch.nn.functional.interpolate(torch.from_numpy(low), size=(32, 32), mode="bilinear", align_corners=False)
    return np.tanh(x.numpy() * 0.8 + shift).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inception")
    weights = random_inception_weights(root / "random-inception.pth")
    reference = data_to_uint8_rgb(images(1, shift=0.3))
    np.savez(root / "reference.npz", images=reference.permute(0, 2, 3, 1).numpy())  # [N, H, W, 3]
    spec = {"feature_extractor": "inception-v3-compat", "feature_extractor_weights_path": str(weights),
            "reference_data": {"kind": "npz_images", "path": str(root / "reference.npz")}}
    return root, weights, reference, spec


def context(samples: np.ndarray, cache_dir: Path, spec: dict) -> EvalContext:
    return EvalContext(cell_dir=cache_dir, cell={"model": "tiny-cifar"}, samples=samples, model_spec=spec,
                       methods={}, cache_dir=cache_dir)


def stepbench_metrics(ctx: EvalContext):
    """FID, KID, IS, precision, recall as `stepbench evaluate` computes them."""
    return tuple(cls().compute(ctx) for cls in (FID, KID, InceptionScore, Precision, Recall))


def torch_fidelity_metrics(samples: np.ndarray, reference: torch.Tensor, weights: Path, **options) -> dict:
    """The same five from torch-fidelity's calculate_metrics on the same images and weights file."""
    return torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(data_to_uint8_rgb(samples)), input2=UInt8ImageDataset(reference),
        fid=True, kid=True, isc=True, prc=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights), cuda=False, cache=False, save_cpu_ram=True, verbose=False,
        **options)


def assert_kid_equals_torch_fidelity(kid, ctx: EvalContext, layer: str, expected: dict, subset_size: int) -> None:
    """KID against calculate_metrics, which sums each subset's kernels (values near 1) in float32, to that
    precision; and to 1e-10 against torch-fidelity's own estimator given the same features in float64."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    assert kid.value == pytest.approx(expected["kernel_inception_distance_mean"], abs=1e-6)
    samples = fidelity.sample_features(ctx)[0][layer]
    reference = fidelity.reference_statistics(ctx)[0].features[layer]
    in_float64 = kid_features_to_metric(samples.double(), reference.double(), kid_subset_size=subset_size,
                                        kid_subsets=fidelity.KID_SUBSETS, rng_seed=fidelity.RNG_SEED, verbose=False)
    assert kid.value == pytest.approx(in_float64["kernel_inception_distance_mean"], rel=1e-10)


def test_inception_metrics_equal_torch_fidelity_calculate_metrics(setup):
    root, weights, reference, spec = setup
    samples = images(2)
    ctx = context(samples, root / "cache", spec)
    fid, kid, isc, precision, recall = stepbench_metrics(ctx)
    expected = torch_fidelity_metrics(samples, reference, weights, kid_subset_size=NUM)

    assert fid.value > 0
    # 12 samples give rank-11 covariances in 2048-d; torch-fidelity's eigvals(S1 S2) then turns ~2000
    # zero eigenvalues into round-off of ~1e-18 whose square roots add ~1e-6 to its trace term, so here
    # the two agree to 1e-5. Full-rank FID agrees to 1e-6 and better: test_fidelity.py (digits),
    # test_fid_trace_term_equals_torch_fidelity below and benchmarks/matrix_sqrt.py (2048-d, 3e-15).
    assert fid.value == pytest.approx(expected["frechet_inception_distance"], rel=1e-5)
    assert_kid_equals_torch_fidelity(kid, ctx, "2048", expected, NUM)
    assert isc.value == pytest.approx(expected["inception_score_mean"], rel=1e-6)
    assert precision.value == expected["precision"] and recall.value == expected["recall"]

    provenance = fid.provenance
    assert provenance["extractor"] == "inception-v3-compat" and provenance["feature_layer"] == "2048"
    assert provenance["weights_sha256"] == file_sha256(weights)
    assert "bilinear" in provenance["resize"] and "299x299" in provenance["resize"]
    assert provenance["backend"] == "torch-fidelity" and provenance["backend_version"] == torch_fidelity.__version__
    assert provenance["num_samples"] == NUM and provenance["reference"]["num_images"] == NUM
    assert provenance["reference"]["kind"] == "npz_images"
    assert isc.provenance["feature_layer"] == "logits_unbiased"
    assert fid.ci_low <= fid.ci_high and kid.ci_low <= kid.ci_high


NUM_FULL_RANK = 70  # > 64 + 1 images per side: full-rank covariances of Inception's 64-d layer
LOW_LAYER = "64"  # after the stem: ~0.1 s an image instead of ~0.3 s for the full network


def detailed_images(seed: int, num: int, shift: float = 0.0) -> np.ndarray:
    """Like `images`, from 8x8 noise: more degrees of freedom (192) than the 64 features."""
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.standard_normal((num, 3, 8, 8)))
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    return np.tanh(x.numpy() * 0.8 + shift).astype(np.float32)


def test_full_rank_inception_layer_metrics_equal_torch_fidelity_to_1e6(setup, tmp_path):
    """The 1e-6 agreement with calculate_metrics, honestly: models.yaml feature_layer_<metric> picks
    Inception's 64-d layer, and more images than dimensions make both covariances full rank, so
    torch-fidelity's eigvals(S1 S2) has no zero eigenvalues to round into its trace term."""
    root, weights, _, spec = setup
    reference = data_to_uint8_rgb(detailed_images(3, NUM_FULL_RANK, shift=0.3))
    np.savez(tmp_path / "reference.npz", images=reference.numpy())
    layers = {f"feature_layer_{metric}": LOW_LAYER for metric in ("fid", "kid", "isc", "prc")}
    spec = {**spec, **layers, "reference_data": {"kind": "npz_images", "path": str(tmp_path / "reference.npz")}}
    samples = detailed_images(4, NUM_FULL_RANK)
    ctx = context(samples, tmp_path / "cache", spec)
    fid, kid, isc, precision, recall = stepbench_metrics(ctx)
    expected = torch_fidelity_metrics(samples, reference, weights, kid_subset_size=NUM_FULL_RANK,
                                      **{f"feature_layer_{metric}": LOW_LAYER for metric in ("fid", "kid", "isc", "prc")})

    features = fidelity.sample_features(ctx)[0][LOW_LAYER].double().numpy()
    assert np.linalg.matrix_rank(np.cov(features, rowvar=False)) == 64  # the premise of the tolerance
    assert fid.value > 0
    assert fid.value == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)
    assert_kid_equals_torch_fidelity(kid, ctx, LOW_LAYER, expected, NUM_FULL_RANK)
    assert isc.value == pytest.approx(expected["inception_score_mean"], rel=1e-6)
    assert precision.value == expected["precision"] and recall.value == expected["recall"]
    for value in (fid, kid, isc, precision):
        assert value.provenance["feature_layer"] == LOW_LAYER
    assert fid.provenance["weights_file"] == str(weights)  # the configured path, not a library cache
    reference_key = fidelity.load_reference_statistics(tmp_path / "cache", fidelity.fidelity_setup(spec, "m")).key
    assert reference_key["layers"] == {"fid": LOW_LAYER, "kid": LOW_LAYER, "prc": LOW_LAYER}


def test_feature_layer_must_be_one_the_extractor_provides(setup):
    _, _, _, spec = setup
    with pytest.raises(ConfigError, match=r"'m.feature_layer_fid': '4096' is not a layer of 'inception-v3-compat'; "
                                          r"valid: 64, 192, 768, 2048"):
        fidelity.fidelity_setup({**spec, "feature_layer_fid": "4096"}, "m")
    default = fidelity.fidelity_setup(spec, "m")
    low = fidelity.fidelity_setup({**spec, "feature_layer_fid": "768"}, "m")
    # another layer is other statistics: its own cache file; the default's path is unchanged by the key
    assert low.layers["fid"] == "768" and default.layers["fid"] == "2048"
    assert fidelity.reference_statistics_path(Path("c"), low) != fidelity.reference_statistics_path(Path("c"), default)


def test_precomputed_mu_sigma_give_the_same_fid_and_refuse_kid(setup, tmp_path):
    root, weights, reference, spec = setup
    cached = fidelity.load_reference_statistics(root / "cache", fidelity.fidelity_setup(spec, "tiny-cifar"))
    np.savez(tmp_path / "fid-ref.npz", mu=cached.fid["mu"], sigma=cached.fid["sigma"])  # EDM's format
    stats_spec = {**spec, "reference_data": {"kind": "npz_stats", "path": str(tmp_path / "fid-ref.npz")}}
    samples = images(2)
    from_images = FID().compute(context(samples, root / "cache", spec)).value
    ctx = context(samples, tmp_path / "cache", stats_spec)
    assert FID().compute(ctx).value == pytest.approx(from_images, rel=1e-9)
    with pytest.raises(StepbenchError, match="kid needs reference images"):
        KID().compute(ctx)


def test_missing_weights_name_the_file_and_where_we_looked(tmp_path, monkeypatch):
    absent = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(StepbenchError, match=f"inception-v3-compat weights not found: looked for {absent} "
                                             r"\(the model entry's key 'feature_extractor_weights_path'\)"):
        resolve_weights("inception-v3-compat", tmp_path, str(absent))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    library_file = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(StepbenchError, match=f"looked for {library_file} .*nothing is downloaded"):
        resolve_weights("inception-v3-compat", tmp_path, None)
    clip_file = tmp_path / "hub" / "checkpoints"
    with pytest.raises(StepbenchError, match=f"clip-vit-b-32 weights not found: looked for {clip_file}/clip-vit-b-32-"):
        resolve_weights("clip-vit-b-32", tmp_path, None)
    with pytest.raises(StepbenchError, match=f"dinov2-vit-s-14 weights not found: looked for {absent} "):
        resolve_weights("dinov2-vit-s-14", tmp_path, str(absent))  # a configured file: harness.metrics.dinov2 loads it


def test_reference_statistics_rebuild_when_the_reference_file_changes(setup, tmp_path):
    root, weights, _, spec = setup
    reference = data_to_uint8_rgb(images(1, 14, shift=0.3))  # more than NUM: 12, then 14 of them
    np.savez(tmp_path / "ref.npz", images=reference[:12].numpy())  # [N, 3, H, W] layout this time
    spec = {**spec, "reference_data": {"kind": "npz_images", "path": str(tmp_path / "ref.npz")}}
    setup_ = fidelity.fidelity_setup(spec, "tiny-cifar")
    path = fidelity.reference_statistics_path(tmp_path / "cache", setup_)
    assert fidelity.load_reference_statistics(tmp_path / "cache", setup_).key["num_images"] == 12
    np.savez(tmp_path / "ref.npz", images=reference[:14].numpy())
    assert fidelity.reference_statistics_path(tmp_path / "cache", setup_) == path  # a path fixed by the config
    rebuilt = fidelity.load_reference_statistics(tmp_path / "cache", setup_)
    assert rebuilt.key["num_images"] == 14 and fidelity._read_reference(path).key["num_images"] == 14


@pytest.mark.parametrize("dim, num", [(256, 400), (64, 30)])
def test_fid_trace_term_equals_torch_fidelity(dim, num):
    """Both factor paths (Cholesky of the reference; Gram of fewer samples than dimensions) against
    torch-fidelity's fid_statistics_to_metric on full-rank reference covariances."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(dim)
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    reference = torch.from_numpy(rng.standard_normal((4 * dim, dim)) @ mix)
    samples = torch.from_numpy(rng.standard_normal((num, dim)) @ (mix + 0.1 * np.eye(dim)) + 0.05)
    ref_stats, sample_stats = fidelity.fid_statistics(reference), fidelity.fid_statistics(samples)
    expected = fid_statistics_to_metric(sample_stats, ref_stats, verbose=False)["frechet_inception_distance"]
    factor = fidelity.covariance_factor(ref_stats["sigma"])
    stats = fidelity.ReferenceStatistics({}, {}, ref_stats, factor, "")
    assert fidelity.fid_from_features(samples, stats) == pytest.approx(expected, rel=1e-6)
    assert fidelity.frechet_statistics_distance(sample_stats, ref_stats) == pytest.approx(expected, rel=1e-6)
