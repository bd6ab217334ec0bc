"""CLIP score and CLAP score, offline, with tiny models built and trained here.

Each tiny model is trained for a few steps on four (input, caption) pairs, saved, and loaded back
through the same code path as a real checkpoint; after training, an input scored against its own
caption must beat the same input against another pair's caption. Random weights could not promise that.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config import validate
from harness.errors import ConfigError, StepbenchError
from harness.evaluate import evaluate_cell
from harness.metrics import METRICS
from harness.metrics.features import data_to_uint8_rgb
from harness.metrics.text_alignment import bootstrap_interval, load_prompts, prompts_for_samples

# --- shared: prompts and intervals ----------------------------------------------------------------


def test_prompts_from_list_and_file_repeat_modulo_n(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a dog  \na bird\n")
    from_file = load_prompts("m", {"prompts": str(tmp_path / "prompts.txt")})
    assert from_file == ["a cat", "a dog", "a bird"]
    assert load_prompts("m", {"prompts": from_file}) == from_file
    assert prompts_for_samples(from_file, 7) == ["a cat", "a dog", "a bird"] * 2 + ["a cat"]


@pytest.mark.parametrize("spec, key", [({}, "m.prompts' missing"), ({"prompts": "nope.txt"}, "nope.txt not found"),
                                       ({"prompts": ["ok", ""]}, "non-empty")])
def test_bad_prompts_are_one_line(spec, key):
    with pytest.raises(ConfigError, match=key) as err:
        load_prompts("m", spec)
    assert "\n" not in str(err.value)


def test_bootstrap_interval_covers_the_mean_shrinks_with_samples_and_is_reproducible():
    rng = np.random.default_rng(1)
    small, large = rng.normal(30, 5, 100), rng.normal(30, 5, 1600)
    low_s, high_s = bootstrap_interval(small)
    low_l, high_l = bootstrap_interval(large)
    assert low_s < small.mean() < high_s and low_l < large.mean() < high_l
    # the standard error falls as 1/sqrt(n): 16x the samples, about a quarter of the width
    assert 0.15 < (high_l - low_l) / (high_s - low_s) < 0.4
    assert bootstrap_interval(small) == (low_s, high_s)


# --- CLIP ---------------------------------------------------------------------------------------------

TINY_CLIP = "stepbench-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    # the vocabulary of open-clip's bundled BPE tokenizer, so captions tokenise offline
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOUR_CAPTIONS = ["a red picture", "a green picture", "a blue picture", "a dark picture"]


def colour_images(height: int = 12, width: int = 16) -> np.ndarray:
    """Four images in [-1, 1], one per caption of COLOUR_CAPTIONS, with a little texture."""
    base = -np.ones((4, 3, 1, 1))
    for i in range(3):
        base[i, i] = 1.0
    texture = 0.2 * np.random.default_rng(0).uniform(-1, 1, (4, 3, height, width))
    return np.clip(base + texture, -1, 1).astype(np.float32)


def train_clip(model, images: np.ndarray, captions: list[str], steps: int = 20) -> None:
    """A few steps of CLIP's symmetric contrastive loss on matched pairs, through the metric's own
    preprocessing, so the trained model ranks an image's caption above the others."""
    import open_clip

    from harness.metrics.clip_score import preprocess_images

    pixels = preprocess_images(data_to_uint8_rgb(images), open_clip.get_model_preprocess_cfg(model))
    tokens = open_clip.get_tokenizer(TINY_CLIP)(captions)
    target = torch.arange(len(captions))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        logits = 10.0 * img @ txt.T
        loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory) -> Path:
    """A tiny open-clip model, trained on the colour pairs and saved as a checkpoint file."""
    import open_clip

    config_dir = tmp_path_factory.mktemp("clip-config")
    (config_dir / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config_dir)  # registers the name, as a built-in config would be
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_CLIP)
        train_clip(model, colour_images(), COLOUR_CAPTIONS)
    path = config_dir / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(clip_checkpoint):
    from harness.metrics.clip_score import load_clip

    return load_clip(TINY_CLIP, str(clip_checkpoint))


def random_images(num: int, seed: int, height: int = 20, width: int = 28) -> torch.Tensor:
    x = np.random.default_rng(seed).uniform(-1, 1, (num, 3, height, width)).astype(np.float32)
    return data_to_uint8_rgb(x)


RANDOM_CAPTIONS = ["a photo of a cat", "an oil painting of a harbour at dusk", "two dogs", "x", "a red car"]


def test_clip_own_caption_beats_a_shuffled_one(tiny_clip):
    from harness.metrics.clip_score import clip_scores

    pixels = data_to_uint8_rgb(colour_images())
    matched = clip_scores(tiny_clip, pixels, COLOUR_CAPTIONS)
    for shift in (1, 2, 3):
        shuffled = clip_scores(tiny_clip, pixels, np.roll(COLOUR_CAPTIONS, shift).tolist())
        assert (matched > shuffled).all(), (shift, matched, shuffled)


def test_clip_score_is_100_times_the_clipped_cosine_of_the_encoders(tiny_clip, clip_checkpoint):
    """The metric against the formula computed straight from open-clip's encoders."""
    import open_clip

    from harness.metrics.clip_score import clip_scores, preprocess_images

    pixels, captions = random_images(10, seed=3), (RANDOM_CAPTIONS * 2)
    model = open_clip.create_model(TINY_CLIP, pretrained=str(clip_checkpoint)).eval()
    with torch.no_grad():
        img = model.encode_image(preprocess_images(pixels, open_clip.get_model_preprocess_cfg(model)))
        txt = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(captions))
    img, txt = img.double().numpy(), txt.double().numpy()
    cosine = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    np.testing.assert_allclose(clip_scores(tiny_clip, pixels, captions), 100 * np.maximum(cosine, 0), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_clip_preprocessing_equals_the_transform_open_clip_returns(resize_mode, clip_checkpoint):
    """The preprocess that create_model_and_transforms hands a user, applied to the same uint8 images."""
    import open_clip
    from PIL import Image

    from harness.metrics.clip_score import preprocess_images

    model, _, transform = open_clip.create_model_and_transforms(
        TINY_CLIP, pretrained=str(clip_checkpoint), image_resize_mode=resize_mode)
    for height, width in ((20, 28), (48, 40)):  # up- and down-sampling, both aspect ratios
        pixels = random_images(3, seed=5, height=height, width=width)
        reference = torch.stack([transform(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
        ours = preprocess_images(pixels, open_clip.get_model_preprocess_cfg(model))
        assert ours.shape == (3, 3, 32, 32)
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_clip_score_bounds_determinism_batch_size_and_joint_permutation(tiny_clip):
    from harness.metrics.clip_score import clip_scores

    pixels, captions = random_images(12, seed=4), (RANDOM_CAPTIONS * 3)[:12]
    scores = clip_scores(tiny_clip, pixels, captions, batch_size=5)
    assert ((scores >= 0) & (scores <= 100)).all()
    np.testing.assert_array_equal(clip_scores(tiny_clip, pixels, captions, batch_size=5), scores)
    np.testing.assert_allclose(clip_scores(tiny_clip, pixels, captions, batch_size=1), scores, rtol=1e-5, atol=1e-4)
    perm = np.random.default_rng(0).permutation(12)
    permuted = clip_scores(tiny_clip, pixels[perm], [captions[i] for i in perm], batch_size=5)
    np.testing.assert_allclose(permuted, scores[perm], rtol=1e-5, atol=1e-4)


def test_clip_missing_weights_are_one_line_naming_model_and_place(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from harness.metrics.clip_score import load_clip

    with pytest.raises(StepbenchError, match=f"CLIP ViT-B-32: weights not found; looked in the file .*missing.pt"):
        load_clip("ViT-B-32", str(tmp_path / "missing.pt"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network attempt in a test
    with pytest.raises(StepbenchError) as err:
        load_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "ViT-B-32/laion2b_s34b_b79k" in message and str(tmp_path) in message
    with pytest.raises(ConfigError, match="neither a file nor a tag"):
        load_clip("ViT-B-32", "no-such-tag")


def test_clip_tag_resolves_to_the_hub_cache_without_network(tmp_path, monkeypatch):
    """A tag whose file sits in the Hugging Face cache loads from there, offline."""
    import huggingface_hub.constants

    from harness.metrics.clip_score import resolve_checkpoint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    snapshot = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"stand-in")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    path, tag_cfg = resolve_checkpoint("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert path.read_bytes() == b"stand-in"
    assert tag_cfg["resize_mode"] == "shortest"  # the tag's preprocessing travels with it


def write_cell(cell_dir: Path, model_id: str, samples: np.ndarray) -> Path:
    cell_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cell_dir / "samples.npz", samples=samples)
    (cell_dir / "cell.json").write_text(json.dumps({"model": model_id, "status": "ok", "seed": 0,
                                                    "num_samples": len(samples)}))
    return cell_dir


def test_clip_score_metric_end_to_end(tmp_path, clip_checkpoint):
    (tmp_path / "prompts.txt").write_text("\n".join(COLOUR_CAPTIONS) + "\n")
    spec = {"adapter": "some_text_to_image", "process": {"kind": "vp_discrete"}, "metrics": ["clip_score"],
            "prompts": str(tmp_path / "prompts.txt"), "clip": {"model": TINY_CLIP, "pretrained": str(clip_checkpoint)}}
    validate({"tiny": spec}, "models", "models.yaml")
    samples = np.concatenate([colour_images()] * 3)  # sample i is the image of prompt i mod 4
    out = evaluate_cell(write_cell(tmp_path / "cell", "tiny", samples), spec, {}, ["clip_score"], tmp_path / "cache")
    assert METRICS.get("clip_score").higher_is_better
    low, high = out["ci"]["clip_score"]
    assert 0 <= low <= out["clip_score"] <= high <= 100
    provenance = out["provenance"]["clip_score"]
    assert provenance["num_samples"] == 12 and provenance["num_prompts"] == 4
    assert provenance["clip_model"] == TINY_CLIP and len(provenance["checkpoint_sha256"]) == 64
    assert json.loads((tmp_path / "cell" / "metrics.json").read_text())["clip_score"] == out["clip_score"]

    # the same images against each other's captions: the score must drop
    spec_shuffled = {**spec, "prompts": COLOUR_CAPTIONS[1:] + COLOUR_CAPTIONS[:1]}
    shuffled = evaluate_cell(tmp_path / "cell", spec_shuffled, {}, ["clip_score"], tmp_path / "cache")
    assert shuffled["clip_score"] < low


def test_clip_score_rejects_non_image_samples(tmp_path, clip_checkpoint):
    spec = {"prompts": ["a"], "clip": {"model": TINY_CLIP, "pretrained": str(clip_checkpoint)}}
    with pytest.raises(StepbenchError, match=r"image samples \[S, 1 or 3, H, W\]"):
        evaluate_cell(write_cell(tmp_path, "tiny", np.zeros((4, 2), np.float32)), spec, {}, ["clip_score"], tmp_path)
