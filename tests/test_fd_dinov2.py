"""fd_dinov2 offline: torch-fidelity's DINOv2 extractor with the network loaded from a local file.

A DINOv2-shaped ViT (the real parameter names, 14-pixel patches, 37 x 37 position embeddings interpolated to
16 x 16 at 224 px) at a tiny width stands in for ViT-L/14: its random weights are saved in tmp_path as the hub's
file would be, and the metric must (1) run with torch.hub and urllib raising, (2) equal the Fréchet distance
written out with numpy/scipy on the same features, (3) refuse a missing file in one ConfigError line naming the
download. The network is cross-checked against transformers' Dinov2Model at its native resolution (no position
interpolation, where the two agree) and, where a clone of facebookresearch/dinov2 is on this machine
(STEPBENCH_DINOV2_REPO), against the hub code itself at 224 px.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import write_evaluable_cell

from harness.errors import ConfigError
from harness.evaluate import evaluate_cell
from harness.metrics import METRICS, dinov2
from harness.metrics.features import data_to_uint8_rgb

TINY = (32, 2, 2, "mlp")  # width, depth, heads, ffn: ViT-L/14's layout at a test's size


@pytest.fixture
def tiny_vitl(monkeypatch):
    """dinov2-vit-l-14 built at the tiny width for this test (its name, file name and download line unchanged)."""
    monkeypatch.setitem(dinov2.ARCHITECTURES, "dinov2-vit-l-14", TINY)


def random_weights(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = dinov2.DinoV2(*TINY)
    with torch.no_grad():  # non-trivial position embeddings and tokens, so their interpolation matters
        model.pos_embed.normal_(0, 0.5)
        model.cls_token.normal_(0, 0.5)
        for block in model.blocks:
            block.ls1.gamma.uniform_(0.5, 1.5)
            block.ls2.gamma.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def images(seed: int, num: int, shift: float = 0.0) -> np.ndarray:
    """Smooth random 24 x 24 colour images in [-1, 1]."""
    low = torch.from_numpy(np.random.default_rng(seed).standard_normal((num, 3, 4, 4)))
    x = torch.nn.functional.interpolate(low, size=(24, 24), mode="bilinear", align_corners=False)
    return np.tanh(x.numpy() * 0.8 + shift).astype(np.float32)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network or torch.hub access")

    for name in ("load", "load_state_dict_from_url", "download_url_to_file"):
        monkeypatch.setattr(torch.hub, name, refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def reference_fd(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + tr(S_x + S_y - 2 sqrtm(S_x S_y)), as the papers write it."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s_x @ s_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2 * root))


def write_cell(cell_dir: Path, samples: np.ndarray) -> Path:
    return write_evaluable_cell(cell_dir, samples, model="tiny")


def test_fd_dinov2_equals_the_frechet_distance_of_the_same_features(tmp_path, tiny_vitl, no_network):
    weights = random_weights(tmp_path / "weights" / "dinov2_vitl14_pretrain.pth")
    samples, reference = images(0, 48), data_to_uint8_rgb(images(1, 40, shift=0.4))
    np.savez(tmp_path / "ref.npz", images=reference.numpy())
    spec = {"reference_data": {"kind": "npz_images", "path": str(tmp_path / "ref.npz")},
            "dinov2": {"weights": str(weights)}, "bootstrap": {"resamples": 0}}
    out = evaluate_cell(write_cell(tmp_path / "cell", samples), spec, {}, ["fd_dinov2"], tmp_path / "cache")

    extractor = dinov2.FeatureExtractorDinoV2File("stepbench-dinov2-vit-l-14", ["dinov2"],
                                                  feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        x = extractor(data_to_uint8_rgb(samples))[0].double().numpy()
        y = extractor(reference)[0].double().numpy()
    assert x.shape == (48, 32)
    assert out["fd_dinov2"] == pytest.approx(reference_fd(x, y), rel=1e-5)
    assert out["fd_dinov2"] > 1.0  # the shifted reference is far: a distance that cannot be ~0 by accident
    provenance = out["provenance"]["fd_dinov2"]
    assert provenance["extractor"] == "dinov2-vit-l-14" and provenance["weights_file"] == str(weights)
    assert "224x224" in provenance["resize"] and provenance["reference"]["num_images"] == 40
    assert not METRICS.get("fd_dinov2").higher_is_better

    # the reference statistics are cached: a second cell reads them (same key), and gets the same number
    again = evaluate_cell(tmp_path / "cell", spec, {}, ["fd_dinov2"], tmp_path / "cache")
    assert again["fd_dinov2"] == pytest.approx(out["fd_dinov2"], rel=1e-12)
    assert len(list((tmp_path / "cache" / "refstats").glob("*.npz"))) == 1


def test_the_extractor_is_torch_fidelitys_forward_on_the_local_network(tmp_path, tiny_vitl):
    """Preprocessing is torch-fidelity's own (resize, normalisation): only the network comes from the file."""
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    weights = random_weights(tmp_path / "w.pth")
    extractor = dinov2.FeatureExtractorDinoV2File("stepbench-dinov2-vit-l-14", ["dinov2"],
                                                  feature_extractor_weights_path=str(weights))
    assert type(extractor).forward is FeatureExtractorDinoV2.forward
    pixels = data_to_uint8_rgb(images(2, 3))
    x = interpolate_bilinear_2d_like_tensorflow1x(pixels.float(), size=(224, 224), align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]) * 255, torch.tensor([0.229, 0.224, 0.225]) * 255
    network = dinov2.load_dinov2("dinov2-vit-l-14", weights)
    with torch.no_grad():
        expected = network((x - mean[:, None, None]) / std[:, None, None])
        torch.testing.assert_close(extractor(pixels)[0], expected, rtol=1e-5, atol=1e-5)


def hf_state_dict(ours: dict) -> dict:
    """Our (the original dinov2) parameter names -> transformers' Dinov2Model names."""
    out = {"embeddings.cls_token": ours["cls_token"], "embeddings.mask_token": ours["mask_token"],
           "embeddings.position_embeddings": ours["pos_embed"], "layernorm.weight": ours["norm.weight"],
           "layernorm.bias": ours["norm.bias"]}
    for kind in ("weight", "bias"):
        out[f"embeddings.patch_embeddings.projection.{kind}"] = ours[f"patch_embed.proj.{kind}"]
    for i in range(TINY[1]):
        block, layer = f"blocks.{i}", f"encoder.layer.{i}"
        for kind in ("weight", "bias"):
            q, k, v = ours[f"{block}.attn.qkv.{kind}"].chunk(3)
            out.update({f"{layer}.attention.q_proj.{kind}": q, f"{layer}.attention.k_proj.{kind}": k,
                        f"{layer}.attention.v_proj.{kind}": v,
                        f"{layer}.attention.o_proj.{kind}": ours[f"{block}.attn.proj.{kind}"]})
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{layer}.{name}.{kind}"] = ours[f"{block}.{name}.{kind}"]
        out[f"{layer}.layer_scale1.lambda1"] = ours[f"{block}.ls1.gamma"]
        out[f"{layer}.layer_scale2.lambda1"] = ours[f"{block}.ls2.gamma"]
    return out


def test_the_network_equals_transformers_dinov2_at_its_native_resolution(tmp_path, tiny_vitl):
    transformers = pytest.importorskip("transformers")
    weights = random_weights(tmp_path / "w.pth")
    ours = dinov2.load_dinov2("dinov2-vit-l-14", weights)
    width, depth, heads, _ = TINY
    config = transformers.Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                       mlp_ratio=4, patch_size=14, image_size=518, layer_norm_eps=1e-6,
                                       layerscale_value=1.0, qkv_bias=True, hidden_act="gelu")
    theirs = transformers.Dinov2Model(config).eval()
    missing, unexpected = theirs.load_state_dict(hf_state_dict(ours.state_dict()), strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).pooler_output, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("STEPBENCH_DINOV2_REPO"),
                    reason="needs a local clone of facebookresearch/dinov2 (STEPBENCH_DINOV2_REPO)")
def test_the_extractor_equals_the_hub_code_at_224(tmp_path):
    """The original code (torch.hub from a local folder, random ViT-S/14 weights) through torch-fidelity's own
    preprocessing, against our network loaded from the same state dict: the position interpolation included."""
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    os.environ["XFORMERS_DISABLED"] = "1"
    hub = torch.hub.load(os.environ["STEPBENCH_DINOV2_REPO"], "dinov2_vits14", source="local", pretrained=False)
    torch.manual_seed(0)
    with torch.no_grad():
        hub.pos_embed.normal_(0, 0.5)
    torch.save(hub.state_dict(), tmp_path / "dinov2_vits14_pretrain.pth")
    ours = dinov2.FeatureExtractorDinoV2File("stepbench-dinov2-vit-s-14", ["dinov2"],
                                             feature_extractor_weights_path=str(tmp_path / "dinov2_vits14_pretrain.pth"))
    reference = FeatureExtractorDinoV2.__new__(FeatureExtractorDinoV2)  # its forward, with the hub's network
    torch.nn.Module.__init__(reference)
    reference.features_list, reference.feature_extractor_internal_dtype = ["dinov2"], torch.float32
    reference.model = hub.eval()
    pixels = data_to_uint8_rgb(images(3, 4))
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels)[0], reference(pixels)[0], rtol=1e-4, atol=1e-5)


def test_missing_weights_or_settings_are_one_config_line(tmp_path, tiny_vitl, no_network):
    from harness.metrics.fd_dinov2 import check_weights, dinov2_setup

    np.savez(tmp_path / "ref.npz", images=data_to_uint8_rgb(images(1, 4)).numpy())
    ref = {"kind": "npz_images", "path": str(tmp_path / "ref.npz")}
    absent = tmp_path / "nowhere" / "dinov2_vitl14_pretrain.pth"
    spec = {"reference_data": ref, "dinov2": {"weights": str(absent)}}
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    with pytest.raises(ConfigError, match=rf"^key 'tiny.dinov2.weights': {absent} not found; .*wget {url} -O {absent}`$"):
        evaluate_cell(write_cell(tmp_path / "cell", images(0, 4)), spec, {}, ["fd_dinov2"], tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"^key 'm.dinov2.weights' missing; .*wget"):
        dinov2_setup({"reference_data": ref}, "m")
    with pytest.raises(ConfigError, match=r"'m.dinov2.model': 'dinov2-vit-h-14' unknown"):
        dinov2_setup({"reference_data": ref, "dinov2": {"weights": "w", "model": "dinov2-vit-h-14"}}, "m")
    stats = {"kind": "npz_stats", "path": "inception-stats.npz"}
    with pytest.raises(ConfigError, match=r"statistics of the FID extractor; .*set m.dinov2.reference_data"):
        dinov2_setup({"reference_data": stats, "dinov2": {"weights": "w"}}, "m")
    setup = dinov2_setup({"reference_data": stats, "dinov2": {"weights": "w", "reference_data": ref}}, "m")
    assert setup.source.name == str(tmp_path / "ref.npz") and setup.extractor == "dinov2-vit-l-14"
    other = tmp_path / "other.pth"
    other.write_bytes(b"not a checkpoint")
    assert check_weights(dinov2_setup({"reference_data": ref, "dinov2": {"weights": str(other)}}, "m"), "m") == other


def test_a_foreign_weights_file_is_refused(tmp_path, tiny_vitl):
    from harness.errors import StepbenchError

    torch.save({"cls_token": torch.zeros(1, 1, 32)}, tmp_path / "w.pth")
    with pytest.raises(StepbenchError, match="do not fit dinov2-vit-l-14"):
        dinov2.load_dinov2("dinov2-vit-l-14", tmp_path / "w.pth")


def test_the_plan_gives_fd_dinov2_its_weights_and_a_refstats_job(tmp_path):
    import yaml

    from harness.workflow import plan

    weights = tmp_path / "dinov2_vitl14_pretrain.pth"
    entry = {"adapter": "digits_ideal", "dataset": "digits", "process": {
        "kind": "vp_discrete", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
        "num_train_timesteps": 1000}, "metrics": ["fd_dinov2"], "dinov2": {"weights": str(weights)}, "num_samples": 8}
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"d": entry}))
    config = {"models_file": str(tmp_path / "models.yaml"), "methods_file": "methods.yaml",
              "results_dir": str(tmp_path / "r"), "models": ["d"], "methods": ["dpmpp_2m"], "nfe": [5]}
    with pytest.raises(ConfigError, match=rf"'d.dinov2.weights': {weights} not found; .*wget "):
        plan(config)
    weights.write_bytes(b"placeholder: planning reads no weights")
    result = plan(config)
    stats = next(p for p in result.eval_inputs[("d", 0)] if p.parent.name == "refstats")
    assert weights in result.eval_inputs[("d", 0)]
    assert result.refstats_job(stats) == ("d", [], "fd_dinov2")
