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

from conftest import write_evaluable_cell
from harness.config import validate
from harness.errors import ConfigError, StepbenchError
from harness.evaluate import evaluate_cell
from harness.metrics import METRICS
from harness.metrics.features import data_to_uint8_rgb
from harness.metrics.text_alignment import bootstrap_interval, load_prompts, prompt_indices, prompts_for_samples

# --- shared: prompts and intervals ----------------------------------------------------------------


def test_prompts_from_list_and_file(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a dog  \na bird\n")
    from_file = load_prompts("m", {"prompts": str(tmp_path / "prompts.txt")})
    assert from_file == ["a cat", "a dog", "a bird"]
    assert load_prompts("m", {"prompts": from_file}) == from_file
    captions = prompts_for_samples(from_file, 0, 7)
    assert sorted(captions[:3]) == sorted(from_file) and sorted(captions[3:6]) == sorted(from_file)  # balanced
    assert captions == [from_file[k] for k in prompt_indices(0, range(7), 3)]



def test_the_shipped_prompt_list_loads_distinct_captions():
    from conftest import REPO

    captions = load_prompts("m", {"prompts": str(REPO / "prompts" / "small.txt")})
    assert len(captions) == 48 == len(set(captions)) and all(c == c.strip() and c for c in captions)


def test_a_samples_prompt_depends_on_seed_and_index_only():
    n, count = 7, 30
    whole = prompt_indices(4, range(count), n)
    # any batching, any order: sample i keeps its caption
    batched = np.concatenate([prompt_indices(4, range(a, b), n) for a, b in ((0, 3), (3, 16), (16, 17), (17, 30))])
    np.testing.assert_array_equal(batched, whole)
    order = np.random.default_rng(0).permutation(count)
    np.testing.assert_array_equal(prompt_indices(4, order, n), whole[order])
    # each block of N samples takes every caption once; the blocks' orders differ
    for block in range(count // n):
        assert sorted(whole[block * n:(block + 1) * n]) == list(range(n))
    # the documented rule: a permutation drawn from (seed, block) on the prompts' own stream
    from harness.metrics.text_alignment import PROMPT_STREAM

    expected = [np.random.default_rng([4, i // n, PROMPT_STREAM]).permutation(n)[i % n] for i in range(count)]
    np.testing.assert_array_equal(whole, expected)
    # another seed of the grid: another assignment (of 50 captions, the same one by chance has probability 1/50!)
    assert not np.array_equal(prompt_indices(0, range(50), 50), prompt_indices(1, range(50), 50))
    # class labels of the same (seed, i) come from another stream
    from harness.labels import sample_labels

    assert not np.array_equal(sample_labels(0, range(50), 50), prompt_indices(0, range(50), 50))


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

    with pytest.raises(StepbenchError, match="CLIP ViT-B-32: weights not found; looked in the file .*missing.pt"):
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


def write_cell(cell_dir: Path, model_id: str, samples: np.ndarray, prompt_index=None) -> Path:
    """A cell of `samples`; sample i recorded as drawn from caption prompt_index[i] (by default i mod 4: the
    order colour_images and tones come in)."""
    prompt_index = np.arange(len(samples)) % 4 if prompt_index is None else np.asarray(prompt_index)
    return write_evaluable_cell(cell_dir, samples, arrays={"prompt_index": prompt_index}, model=model_id)


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


def test_clip_score_reads_the_cells_recorded_prompt_indices(tmp_path, clip_checkpoint):
    spec = {"prompts": COLOUR_CAPTIONS, "clip": {"model": TINY_CLIP, "pretrained": str(clip_checkpoint)}}
    in_order = evaluate_cell(write_cell(tmp_path / "a", "tiny", np.concatenate([colour_images()] * 3)), spec, {},
                             ["clip_score"], tmp_path / "cache")["clip_score"]
    # a seed's own order: the images drawn for prompt_indices(5, i), recorded so: the same pairs, the same score
    order = prompt_indices(5, range(12), 4)
    recorded = evaluate_cell(write_cell(tmp_path / "b", "tiny", colour_images()[order], prompt_index=order), spec, {},
                             ["clip_score"], tmp_path / "cache")["clip_score"]
    assert recorded == pytest.approx(in_order, rel=1e-9)
    # the same images with another record: scored against those captions, so lower (i mod 4 is not order)
    wrong = evaluate_cell(write_cell(tmp_path / "c", "tiny", colour_images()[order]), spec, {}, ["clip_score"],
                          tmp_path / "cache")["clip_score"]
    assert wrong < recorded
    write_evaluable_cell(tmp_path / "d", colour_images(), model="tiny")  # no prompt_index recorded
    with pytest.raises(StepbenchError, match="records no prompt_index"):
        evaluate_cell(tmp_path / "d", spec, {}, ["clip_score"], tmp_path / "cache")
    with pytest.raises(StepbenchError, match="reaches 7 but the model has 4 prompts"):
        evaluate_cell(write_cell(tmp_path / "e", "tiny", colour_images(), prompt_index=[0, 1, 2, 7]), spec, {},
                      ["clip_score"], tmp_path / "cache")


def test_clip_score_rejects_non_image_samples(tmp_path, clip_checkpoint):
    spec = {"prompts": ["a"], "clip": {"model": TINY_CLIP, "pretrained": str(clip_checkpoint)}}
    with pytest.raises(StepbenchError, match=r"image samples \[S, 1 or 3, H, W\]"):
        evaluate_cell(write_cell(tmp_path, "tiny", np.zeros((4, 2), np.float32)), spec, {}, ["clip_score"], tmp_path)


# --- CLAP ---------------------------------------------------------------------------------------------

CLAP_RATE = 8000  # the tiny extractor's rate; samples are made at AUDIO_RATE and resampled to it
AUDIO_RATE = 16000
TONE_CAPTIONS = ["a steady tone", "white noise", "a click train", "a rising chirp"]


def tones(seconds: float = 0.75, rate: int = AUDIO_RATE) -> np.ndarray:
    """Four clips [4, T] at `rate`, one per caption of TONE_CAPTIONS. Their textures differ, not only
    their pitch: HTSAT pools over the spectrogram, so tones of different pitch alone look alike to it."""
    t = np.arange(int(seconds * rate)) / rate
    clicks = np.zeros_like(t)
    clicks[:: rate // 10] = 1.0
    noise = 0.3 * np.random.default_rng(0).standard_normal(len(t))
    chirp = 0.5 * np.sin(2 * np.pi * (200 * t + 2500 * t ** 2))
    return np.stack([0.5 * np.sin(2 * np.pi * 500 * t), noise, clicks, chirp]).astype(np.float32)


def tiny_roberta_tokenizer(directory: Path, model_max_length: int):
    """CLAP's Roberta tokenizer over a byte-level BPE with no merges (every byte is a token), written to
    `directory` (vocab.json, merges.txt): offline, and every caption tokenises. Ids: <s> 0, <pad> 1, </s> 2."""
    from transformers import RobertaTokenizer

    # GPT-2's byte -> printable-character table, the alphabet of byte-level BPE
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    alphabet = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "<unk>", *alphabet, "<mask>"])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return RobertaTokenizer.from_pretrained(directory, model_max_length=model_max_length)


def write_tiny_clap_files(directory: Path) -> None:
    """An untrained tiny ClapModel with its processor: tiny_roberta_tokenizer and a 1-second, 8 kHz, 16-mel
    feature extractor."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    tokenizer = tiny_roberta_tokenizer(directory, model_max_length=32)
    vocab = tokenizer.get_vocab()
    extractor = ClapFeatureExtractor(feature_size=16, sampling_rate=CLAP_RATE, hop_length=160, max_length_s=1,
                                     fft_window_size=256, frequency_min=50, frequency_max=4000,
                                     truncation="rand_trunc", padding="repeatpad")
    config = ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=40, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, projection_dim=16),
        audio_config=dict(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=[4, 4], window_size=4,
                          depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32, patch_embeds_hidden_size=16,
                          enable_fusion=False, projection_dim=16),
        projection_dim=16)
    ClapModel(config).save_pretrained(directory)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)


def train_clap(directory: Path, audio: np.ndarray, captions: list[str], steps: int = 100) -> None:
    """Contrastive training of the projection heads on matched (clip, caption) pairs, through the metric's
    own features. The encoders stay frozen: a tiny HTSAT learns too slowly on two shared CPU cores, and
    its pooled outputs of different clips already differ, so the heads can pull each pair together."""
    from transformers import ClapModel, ClapProcessor

    from harness.metrics.clap_score import audio_features, resample

    model, processor = ClapModel.from_pretrained(directory).eval(), ClapProcessor.from_pretrained(directory)
    features, longer = audio_features(processor.feature_extractor, resample(audio.astype(np.float64), AUDIO_RATE,
                                                                            CLAP_RATE))
    tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled_audio = model.audio_model(input_features=features.float(), is_longer=longer).pooler_output
        pooled_text = model.text_model(**tokens).pooler_output
    heads = [*model.audio_projection.parameters(), *model.text_projection.parameters()]
    optimiser = torch.optim.Adam(heads, lr=1e-2)
    target = torch.arange(len(captions))
    for _ in range(steps):
        a = torch.nn.functional.normalize(model.audio_projection(pooled_audio), dim=-1)
        t = torch.nn.functional.normalize(model.text_projection(pooled_text), dim=-1)
        logits = 10.0 * a @ t.T
        loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-clap")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        write_tiny_clap_files(directory)
        train_clap(directory, tones(), TONE_CAPTIONS)
    return directory


@pytest.fixture(scope="module")
def tiny_clap(clap_dir):
    from harness.metrics.clap_score import load_clap

    return load_clap(str(clap_dir))


def noise_clips(num: int, seconds: float, seed: int, rate: int = AUDIO_RATE) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal((num, int(seconds * rate)))).astype(np.float32)


def test_clap_own_caption_beats_a_shuffled_one(tiny_clap):
    from harness.metrics.clap_score import clap_scores

    matched = clap_scores(tiny_clap, tones(), AUDIO_RATE, TONE_CAPTIONS)
    for shift in (1, 2, 3):
        shuffled = clap_scores(tiny_clap, tones(), AUDIO_RATE, np.roll(TONE_CAPTIONS, shift).tolist())
        assert (matched > shuffled).all(), (shift, matched, shuffled)


def test_clap_score_equals_the_cosine_of_transformers_clap_forward(tiny_clap, clap_dir):
    """Short clips, rand_trunc: transformers' own processor + ClapModel.forward give the embeddings."""
    from transformers import ClapModel, ClapProcessor

    from harness.metrics.clap_score import clap_scores, resample

    clips, captions = noise_clips(6, 0.5, seed=1), (TONE_CAPTIONS + ["x", "a dog barking twice"])
    model, processor = ClapModel.from_pretrained(clap_dir).eval(), ClapProcessor.from_pretrained(clap_dir)
    audio = processor.feature_extractor(list(resample(clips.astype(np.float64), AUDIO_RATE, CLAP_RATE)),
                                        sampling_rate=CLAP_RATE, return_tensors="pt")
    text = processor.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**text, input_features=audio["input_features"].float(), is_longer=audio["is_longer"])
    expected = torch.nn.functional.cosine_similarity(out.audio_embeds.double(), out.text_embeds.double()).numpy()
    np.testing.assert_allclose(clap_scores(tiny_clap, clips, AUDIO_RATE, captions), expected, rtol=1e-5, atol=1e-6)


def test_clap_score_bounds_determinism_batch_size_and_joint_permutation(tiny_clap):
    from harness.metrics.clap_score import clap_scores

    # 1.5 s clips: longer than the 1 s window, so the extractor crops them at random
    clips, captions = noise_clips(7, 1.5, seed=2), (TONE_CAPTIONS * 2)[:7]
    np.random.seed(123)
    scores = clap_scores(tiny_clap, clips, AUDIO_RATE, captions, batch_size=3)
    state = np.random.get_state()
    assert ((scores >= -1) & (scores <= 1)).all()
    np.random.seed(7)  # the caller's RNG does not pick the crops ...
    np.testing.assert_array_equal(clap_scores(tiny_clap, clips, AUDIO_RATE, captions, batch_size=3), scores)
    np.random.set_state(state)
    clap_scores(tiny_clap, clips[:1], AUDIO_RATE, captions[:1])
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # ... and is left as it was
    np.testing.assert_allclose(clap_scores(tiny_clap, clips, AUDIO_RATE, captions, batch_size=1), scores, atol=1e-5)
    np.testing.assert_allclose(clap_scores(tiny_clap, clips[:, None], AUDIO_RATE, captions), scores, atol=1e-5)
    perm = np.random.default_rng(0).permutation(7)
    permuted = clap_scores(tiny_clap, clips[perm], AUDIO_RATE, [captions[i] for i in perm], batch_size=3)
    np.testing.assert_allclose(permuted, scores[perm], atol=1e-5)


def test_resampling_keeps_a_tone():
    from harness.metrics.clap_score import resample

    t_in, t_out = np.arange(16000) / 16000, np.arange(8000) / 8000
    out = resample(np.sin(2 * np.pi * 440 * t_in)[None], 16000, 8000)
    assert out.shape == (1, 8000)
    interior = slice(200, -200)  # the filter's edges see zero padding
    np.testing.assert_allclose(out[0, interior], np.sin(2 * np.pi * 440 * t_out)[interior], atol=1e-2)
    same = np.ones((2, 5))
    assert resample(same, 8000, 8000) is same


def test_clap_bad_audio_and_missing_weights_are_one_line(tmp_path, monkeypatch, tiny_clap):
    import huggingface_hub.constants

    from harness.metrics.clap_score import clap_scores, load_clap

    with pytest.raises(StepbenchError, match=r"mono audio samples \[S, T\] or \[S, 1, T\]; got \[2, 2, 100\]"):
        clap_scores(tiny_clap, np.zeros((2, 2, 100)), AUDIO_RATE, ["a", "b"])
    with pytest.raises(StepbenchError, match=f"CLAP {tmp_path}/nope: weights not found; looked in the directory"):
        load_clap(str(tmp_path / "nope"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network attempt in a test
    with pytest.raises(StepbenchError) as err:
        load_clap("laion/clap-htsat-unfused", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "CLAP laion/clap-htsat-unfused" in message and str(tmp_path) in message


def test_clap_score_metric_end_to_end(tmp_path, clap_dir):
    spec = {"adapter": "some_text_to_audio", "process": {"kind": "vp_discrete"}, "metrics": ["clap_score"],
            "prompts": TONE_CAPTIONS, "sample_rate": AUDIO_RATE, "clap": {"model": str(clap_dir), "batch_size": 4}}
    validate({"tiny": spec}, "models", "models.yaml")
    samples = np.concatenate([tones()] * 2)[:, None]  # [S, 1, T]; sample i plays the tone of prompt i mod 4
    out = evaluate_cell(write_cell(tmp_path / "cell", "tiny", samples), spec, {}, ["clap_score"], tmp_path / "cache")
    low, high = out["ci"]["clap_score"]
    assert -1 <= low <= out["clap_score"] <= high <= 1
    provenance = out["provenance"]["clap_score"]
    assert provenance["num_samples"] == 8 and provenance["resampled"] and provenance["clap_sampling_rate"] == CLAP_RATE
    assert len(provenance["weights_sha256"]) == 64
    shuffled = evaluate_cell(tmp_path / "cell", {**spec, "prompts": TONE_CAPTIONS[1:] + TONE_CAPTIONS[:1]}, {},
                             ["clap_score"], tmp_path / "cache")
    assert shuffled["clap_score"] < low
    with pytest.raises(ConfigError, match="'tiny.sample_rate' missing"):
        evaluate_cell(tmp_path / "cell", {k: v for k, v in spec.items() if k != "sample_rate"}, {}, ["clap_score"],
                      tmp_path / "cache")
