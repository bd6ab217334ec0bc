"""clean-fid's `clean` mode as stepbench's fid_backend, against clean-fid itself on the same folders.

clean-fid only loads its Inception as a torchscript file named inception-2015-12-05.pt through its
InceptionV3W wrapper (which uses `base.layers` on 299x299 inputs scaled to [-1, 1] and expects 2048
features). A small random torchscript with that interface stands in for it here, so the resize, file
decoding, wrapper and statistics are clean-fid's own while the network costs milliseconds.
clean-fid's compute_fid builds its extractor from a hard-coded /tmp path, so the tests hand it their
network through `custom_feat_extractor`: the 2048-d InceptionV3W (slow: scipy sqrtm at 2048-d), and a
64-d network that the backend takes the same way, so compute_fid runs in the default suite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from harness.errors import StepbenchError
from harness.metrics import cleanfid_backend, fidelity
from harness.metrics.base import EvalContext
from harness.metrics.features import data_to_uint8_rgb
from harness.metrics.fidelity import FID, KID, InceptionScore


class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5, stride=4)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return nn.functional.adaptive_avg_pool2d(h, (8, 8)).reshape(x.shape[0], 2048, 1, 1)


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def random_cleanfid_weights(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / cleanfid_backend.WEIGHTS_FILENAME
    torch.jit.script(_Base().eval()).save(str(path))
    return path


def uint8_images(seed: int, num: int, shift: float) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    low = torch.from_numpy(rng.standard_normal((num, 3, 4, 4)))
    x = torch.nn.functional.interpolate(low, size=(24, 24), mode="bilinear", align_corners=False)
    return data_to_uint8_rgb(np.tanh(x.numpy() + shift))


def write_folder(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:05d}.png")  # lossless: the folder holds exactly these pixels
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cleanfid")
    weights = random_cleanfid_weights(root / "weights")
    samples, reference = uint8_images(0, 40, 0.0), uint8_images(1, 50, 0.4)
    return (root, weights, samples, write_folder(root / "samples", samples),
            write_folder(root / "reference", reference))


def context(root: Path, samples: torch.Tensor, weights: Path, reference: Path) -> EvalContext:
    spec = {"fid_backend": "clean-fid", "feature_extractor_weights_path": str(weights.parent),
            "reference_data": {"kind": "folder", "path": str(reference)}, "bootstrap": {"resamples": 20}}
    data = samples.numpy().astype(np.float32) / 127.5 - 1.0  # rounds back to exactly these pixels
    return EvalContext(cell_dir=root, cell={"model": "m"}, samples=data, model_spec=spec, methods={},
                       cache_dir=root / "cache")


def test_features_equal_cleanfid_folder_features(folders):
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    root, weights, samples, sample_dir, _ = folders
    model = InceptionV3W(str(weights.parent), download=False)
    expected = get_folder_features(str(sample_dir), model, num_workers=0, batch_size=8, device=torch.device("cpu"),
                                   mode="clean", verbose=False)
    ours = cleanfid_backend.extract_features(samples, weights)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # clean-fid's scipy sqrtm of a 2048 x 2048 matrix: minutes on a shared CPU
def test_fid_equals_cleanfid_compute_fid_on_the_same_folders(folders):
    from cleanfid import fid as cleanfid
    from cleanfid.inception_torchscript import InceptionV3W

    root, weights, samples, sample_dir, reference_dir = folders
    model = InceptionV3W(str(weights.parent), download=False)
    expected = cleanfid.compute_fid(str(sample_dir), str(reference_dir), mode="clean", custom_feat_extractor=model,
                                    num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False)
    # 40 samples: S1 S2 is singular (scipy warns), so sqrtm's own round-off sets the tolerance
    assert FID().compute(context(root, samples, weights, reference_dir)).value == pytest.approx(expected, rel=1e-5)


class SmallExtractor(nn.Module):
    """A 64-d feature network on clean-fid's custom_feat_extractor contract (float [B, 3, 299, 299] in
    0..255): low-dimensional, so clean-fid's scipy sqrtm takes milliseconds and more images than
    dimensions make both covariances full rank."""

    DIM = 64

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 7, stride=4)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1((x - 128) / 128))))
        return nn.functional.adaptive_avg_pool2d(h, (2, 2)).reshape(len(x), self.DIM)


def test_fid_equals_cleanfid_compute_fid_on_the_same_folders_full_rank(tmp_path):
    """compute_fid itself, in the default suite: the same network handed to both (clean-fid's
    custom_feat_extractor, the backend's `model`), the folders decoded by stepbench's reference loader."""
    from cleanfid import fid as cleanfid

    from harness.metrics.frechet import covariance_factor
    from harness.metrics.refdata import load_reference_images, reference_source

    num_samples, num_reference = 90, 100  # > 64 + 1 each
    sample_dir = write_folder(tmp_path / "samples", uint8_images(2, num_samples, 0.0))
    reference_dir = write_folder(tmp_path / "reference", uint8_images(3, num_reference, 0.4))
    model = SmallExtractor().eval()
    expected = cleanfid.compute_fid(str(sample_dir), str(reference_dir), mode="clean", custom_feat_extractor=model,
                                    num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False)

    def features(folder: Path) -> torch.Tensor:
        source = reference_source({"reference_data": {"kind": "folder", "path": str(folder)}}, "m")
        return cleanfid_backend.extract_features(load_reference_images(source), None, model=model)

    samples, reference = features(sample_dir), features(reference_dir)
    assert samples.shape == (num_samples, SmallExtractor.DIM)
    assert np.linalg.matrix_rank(np.cov(samples.double().numpy(), rowvar=False)) == SmallExtractor.DIM
    stats = fidelity.fid_statistics(reference)
    ref = fidelity.ReferenceStatistics({}, {}, stats, covariance_factor(stats["sigma"], reference), "")
    ours = fidelity.fid_from_features(samples, ref)  # FID's own path (the metric and its bootstrap call it)
    assert ours > 0
    # features are bit-identical; what differs (~2e-7 here) is clean-fid's np.mean of float32 features,
    # a float32 mean (its frechet_distance on float64 means agrees with ours to ~1e-12)
    assert ours == pytest.approx(expected, rel=1e-6)


def test_fid_equals_cleanfid_frechet_distance_on_its_features(folders):
    """The fast counterpart of the slow test: clean-fid's features and statistics (np.mean/np.cov of
    float32), its Fréchet formula with the trace term from an exact 2048-d computation."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    root, weights, samples, sample_dir, reference_dir = folders
    model = InceptionV3W(str(weights.parent), download=False)
    feats = [get_folder_features(str(d), model, num_workers=0, batch_size=8, device=torch.device("cpu"),
                                 mode="clean", verbose=False) for d in (sample_dir, reference_dir)]
    (mu1, s1), (mu2, s2) = ((np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in feats)
    # tr sqrt(S1 S2) from the rank-39 Gram form in float64, independent of stepbench's factor path
    a = (feats[0] - feats[0].mean(0)).astype(np.float64) / np.sqrt(len(feats[0]) - 1)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a.T), 0, None)).sum()
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)

    fid = FID().compute(context(root, samples, weights, reference_dir))
    assert fid.value == pytest.approx(expected, rel=1e-5)
    provenance = fid.provenance
    assert provenance["backend"] == "clean-fid" and provenance["resize"].startswith("clean-fid clean")
    assert provenance["extractor"] == cleanfid_backend.EXTRACTOR and provenance["reference"]["kind"] == "folder"
    assert fid.ci_low < fid.ci_high
    assert KID().compute(context(root, samples, weights, reference_dir)).value > 0
    with pytest.raises(StepbenchError, match="clean-fid backend has no classifier logits"):
        InceptionScore().compute(context(root, samples, weights, reference_dir))


def test_missing_cleanfid_weights_say_where(tmp_path):
    with pytest.raises(StepbenchError, match=f"clean-fid Inception weights not found: looked for "
                                             f"{tmp_path}/inception-2015-12-05.pt"):
        cleanfid_backend.resolve_weights_file(str(tmp_path))
    assert cleanfid_backend.default_weights_file().name == "inception-2015-12-05.pt"
    setup = fidelity.fidelity_setup({"fid_backend": "clean-fid", "dataset": "digits"}, "m")
    assert fidelity.planned_weights(setup, tmp_path) == cleanfid_backend.default_weights_file()
