"""FID/KID/IS through torch-fidelity with the embedded digits-cnn extractor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from click.testing import CliRunner

from harness.cli import cli
from harness.datasets import load_dataset
from harness.errors import ConfigError, StepbenchError
from harness.metrics import fidelity
from harness.metrics.base import EvalContext
from harness.metrics.features import (UInt8ImageDataset, build_extractor, data_to_uint8_rgb, digits_split,
                                      file_sha256, get_extractor, load_checkpoint)
from harness.metrics.fidelity import FID, KID, InceptionScore

DIGITS_SPEC = {"dataset": "digits", "feature_extractor": "digits-cnn"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def weights(cache_dir) -> Path:
    return build_extractor("digits-cnn", cache_dir)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_dataset("digits")


def context(samples: np.ndarray, cache_dir: Path, model_spec: dict = DIGITS_SPEC) -> EvalContext:
    return EvalContext(cell_dir=cache_dir, cell={"model": "digits-ideal"}, samples=samples.astype(np.float32),
                       model_spec=model_spec, methods={}, cache_dir=cache_dir)


def noisy(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    return images + std * np.random.default_rng(seed).standard_normal(images.shape)


def test_metrics_equal_torch_fidelity_calculate_metrics(cache_dir, weights, digits):
    images, _ = digits
    samples = noisy(images[:300], 0.3)
    ctx = context(samples, cache_dir)
    fid, kid, isc = FID().compute(ctx), KID().compute(ctx), InceptionScore().compute(ctx)

    expected = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(data_to_uint8_rgb(samples.astype(np.float32))),
        input2=UInt8ImageDataset(data_to_uint8_rgb(images)),
        fid=True, kid=True, isc=True, feature_extractor="digits-cnn", feature_extractor_weights_path=str(weights),
        feature_layer_fid="feat", feature_layer_kid="feat", feature_layer_isc="logits",
        kid_subset_size=300, cuda=False, cache=False, save_cpu_ram=True, verbose=False)

    assert fid.value == pytest.approx(expected["frechet_inception_distance"], rel=1e-6)
    # torch-fidelity sums its float32 subset kernels in float32: the reduction order is the CPU's (1.2e-6 apart
    # on an AVX-512 machine); the float64 test below checks the estimator itself to 1e-10
    assert kid.value == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-5)
    # torch-fidelity sums each subset's kernels in float32; stepbench in float64 from whole kernel matrices
    assert kid.provenance["std"] == pytest.approx(expected["kernel_inception_distance_std"], rel=1e-4)
    assert isc.value == pytest.approx(expected["inception_score_mean"], rel=1e-6)
    assert isc.provenance["std"] == pytest.approx(expected["inception_score_std"], rel=1e-6)
    assert kid.provenance["subset_size"] == 300  # shrunk from torch-fidelity's 1000 to the sample count


def test_provenance_names_extractor_weights_and_reference(cache_dir, weights, digits):
    ctx = context(noisy(digits[0][:200], 0.1), cache_dir)
    provenance = FID().compute(ctx).provenance
    reference_file = fidelity.reference_statistics_path(cache_dir, "digits", "digits-cnn")
    assert provenance["extractor"] == "digits-cnn"
    assert provenance["weights_sha256"] == file_sha256(weights)
    assert provenance["resize"] == "none"
    assert provenance["backend"] == "torch-fidelity"
    assert provenance["backend_version"] == torch_fidelity.__version__
    assert provenance["num_samples"] == 200
    assert provenance["reference"]["num_images"] == len(digits[0])
    assert provenance["reference"]["stats_sha256"] == fidelity._read_reference(reference_file).sha256


def test_extractor_training_is_deterministic_and_classifies_held_out_digits(weights, digits, tmp_path):
    rebuilt = build_extractor("digits-cnn", tmp_path)  # a second training, from scratch
    first, second = load_checkpoint(weights)["state_dict"], load_checkpoint(rebuilt)["state_dict"]
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert file_sha256(rebuilt) == file_sha256(weights)  # the sha256 recorded in provenance is reproducible

    images, labels = digits
    _, held_out = digits_split(len(images))
    logits = fidelity.extract_features(data_to_uint8_rgb(images[held_out]), "digits-cnn", weights, ["logits"])
    accuracy = (logits["logits"].argmax(1).numpy() == labels[held_out]).mean()
    assert accuracy > 0.9


def test_fid_is_zero_against_itself_and_grows_with_noise(cache_dir, weights, digits):
    images, _ = digits
    self_fid = FID().compute(context(images, cache_dir)).value
    assert abs(self_fid) < 1e-6
    noisy_fids = [FID().compute(context(noisy(images, std), cache_dir)).value for std in (0.1, 0.3, 0.6)]
    assert self_fid < noisy_fids[0] < noisy_fids[1] < noisy_fids[2]


def test_reference_statistics_are_cached_and_rebuilt_when_weights_change(cache_dir, weights, monkeypatch):
    path = fidelity.build_reference_statistics(cache_dir, "digits", "digits-cnn")
    assert path == fidelity.reference_statistics_path(cache_dir, "digits", "digits-cnn")
    mtime = path.stat().st_mtime_ns
    computed = []
    recompute = fidelity.compute_reference_statistics
    monkeypatch.setattr(fidelity, "compute_reference_statistics",
                        lambda *args, **kwargs: computed.append(args) or recompute(*args, **kwargs))

    assert fidelity.build_reference_statistics(cache_dir, "digits", "digits-cnn") == path
    assert computed == [] and path.stat().st_mtime_ns == mtime

    stale = fidelity._read_reference(path)
    stale.key["weights_sha256"] = "0" * 64
    fidelity._write_reference(path, stale)
    fresh = fidelity.load_reference_statistics(cache_dir, "digits", "digits-cnn")
    assert len(computed) == 1
    assert fresh.key["weights_sha256"] == file_sha256(weights)


def test_cli_builds_extractor_and_reference_statistics(cache_dir, weights):
    runner = CliRunner()
    result = runner.invoke(cli, ["extractor", "digits-cnn", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0 and result.output.strip() == str(weights)
    result = runner.invoke(cli, ["refstats", "--dataset", "digits", "--extractor", "digits-cnn",
                                 "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0
    assert result.output.strip() == str(fidelity.reference_statistics_path(cache_dir, "digits", "digits-cnn"))


def test_uint8_conversion_rounds_clips_and_repeats_grey():
    images = np.array([-1.0, 0.0, 1.0, -3.0, 2.0]).reshape(1, 1, 1, 5)
    pixels = data_to_uint8_rgb(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 1, 5)
    assert pixels[0, :, 0].tolist() == [[0, 128, 255, 0, 255]] * 3  # 127.5 rounds half to even


def test_bad_input_names_the_key_and_valid_choices(cache_dir, tmp_path, digits):
    with pytest.raises(ConfigError, match="feature extractor 'inception' unknown.*valid: digits-cnn"):
        get_extractor("inception")
    with pytest.raises(ConfigError, match="dataset 'cifar10' unknown.*valid: digits"):
        fidelity.reference_statistics_path(cache_dir, "cifar10", "digits-cnn")
    with pytest.raises(ConfigError, match="'digits-ideal.feature_extractor' missing"):
        FID().compute(context(digits[0][:10], cache_dir, {"dataset": "digits"}))
    with pytest.raises(StepbenchError, match="weights not found"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(StepbenchError, match="takes 8x8 images"):
        fidelity.extract_features(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "digits-cnn", tmp_path, ["feat"])


def test_kid_equals_torch_fidelitys_estimator_in_float64(cache_dir, weights, digits):
    """Given float64 features, torch-fidelity's kid_features_to_metric computes its subsets' kernels in float64:
    the same estimator, subsets and precision as stepbench's sums over whole kernel matrices."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    from harness.metrics.fidelity import RNG_SEED, PolyKernels, kid_subset_mmds

    generator = torch.Generator().manual_seed(0)
    samples, reference = torch.randn(400, 64, generator=generator), torch.randn(700, 64, generator=generator) + 0.1
    expected = kid_features_to_metric(samples.double(), reference.double(), kid_subsets=100, kid_subset_size=400,
                                      rng_seed=RNG_SEED, verbose=False)
    for kernels in (PolyKernels.of(samples, reference), None):  # whole kernels, and one subset at a time
        mmds = kid_subset_mmds(samples, reference, kernels)
        assert mmds.mean() == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-10)
        assert mmds.std() == pytest.approx(expected["kernel_inception_distance_std"], rel=1e-10)
