"""The TarFlow model: forward map and log-determinant, the denoising step, its two saved formats (ours
and apple/ml-tarflow's pickled state dicts), and deterministic training.

Tiny random models in float64; nothing is downloaded. The inversion algorithms are tested in
test_jacobi_inverse.py.
"""

from __future__ import annotations

import pytest
import torch

from harness.errors import ConfigError, StepbenchError
from harness.models.tarflow import TarFlow, load_apple_checkpoint, load_pretrained, save_pretrained

TINY = {"in_channels": 1, "img_size": 4, "patch_size": 2, "channels": 16, "num_blocks": 2, "layers_per_block": 1,
        "head_dim": 8, "num_classes": 3, "noise_std": 0.1}

# apple/ml-tarflow transformer_flow.Model(in_channels=1, img_size=4, patch_size=2, channels=64, num_blocks=1,
# layers_per_block=1, num_classes=3).state_dict().keys(), written out from its source: the names a real
# checkpoint carries, so a renamed parameter here would make every apple checkpoint unloadable
APPLE_KEYS_ONE_BLOCK = {
    "var", "blocks.0.proj_in.weight", "blocks.0.proj_in.bias", "blocks.0.pos_embed", "blocks.0.class_embed",
    "blocks.0.attn_mask", "blocks.0.proj_out.weight", "blocks.0.proj_out.bias",
    *(f"blocks.0.attn_blocks.0.{name}" for name in (
        "attention.norm.weight", "attention.norm.bias", "attention.qkv.weight", "attention.qkv.bias",
        "attention.proj.weight", "attention.proj.bias", "mlp.norm.weight", "mlp.norm.bias",
        "mlp.main.0.weight", "mlp.main.0.bias", "mlp.main.2.weight", "mlp.main.2.bias")),
}


def random_tarflow(config=TINY, seed=0, out_std=0.1) -> TarFlow:
    """proj_out starts at zero (the identity flow); randomised so every block does something."""
    torch.manual_seed(seed)
    model = TarFlow(**config).double()
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=out_std)
    return model.eval()


def test_parameter_names_are_apples():
    model = TarFlow(in_channels=1, img_size=4, patch_size=2, channels=64, num_blocks=1, layers_per_block=1,
                    num_classes=3)
    assert set(model.state_dict()) == APPLE_KEYS_ONE_BLOCK
    assert model.state_dict()["blocks.0.attn_blocks.0.attention.qkv.weight"].shape == (192, 64)


def test_logdet_is_the_jacobian_log_determinant():
    model = random_tarflow(out_std=0.3)
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([2])
    _, logdet = model(x, y)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 1, 4, 4), y)[0].flatten(), x.flatten())
    sign, expected = torch.linalg.slogdet(jac)
    assert sign > 0
    assert abs(logdet.item() - expected.item()) < 1e-10


def test_patchify_round_trip_and_token_shape():
    model = random_tarflow()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    tokens = model.patchify(x)
    assert tokens.shape == (3, 4, 4)  # T = (4/2)^2, D = 1 * 2^2
    assert torch.equal(model.unpatchify(tokens), x)
    assert torch.equal(tokens[0, 1], x[0, 0, 0:2, 2:4].flatten())  # patch 1 = top right, raster order


def test_dropped_labels_use_the_mean_class_embedding():
    model = random_tarflow()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    z_none, _ = model(x, None)
    z_dropped, _ = model(x, torch.tensor([-1, -1]))
    z_label, _ = model(x, torch.tensor([0, 1]))
    assert torch.equal(z_none, z_dropped)
    assert (z_label - z_none).abs().max() > 1e-6


def test_bad_labels_are_one_line_errors():
    model = random_tarflow()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(StepbenchError, match="out of range"):
        model(x, torch.tensor([0, 3]))
    unconditional = random_tarflow({**TINY, "num_classes": 0})
    with pytest.raises(StepbenchError, match="unconditional"):
        unconditional(x, torch.tensor([0, 1]))


def test_score_denoise_is_apples_gradient_step():
    """apple's evaluate_fid.py: x - lr grad(loss) with lr = B H W C noise_std^2 on its mean loss. Ours
    steps on the summed log-density; the two must agree, and a sample must not depend on its batch."""
    model = random_tarflow()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, -1])
    ours = model.score_denoise(x, y, step_scale=1.3)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.nll_loss(xr, y), [xr])
    apple = x - 1.3 * (4 * 4 * 4 * 1 * 0.1**2) * grad
    assert (ours - x).abs().max() > 1e-3  # it moved
    assert torch.allclose(ours, apple, atol=1e-12, rtol=0)
    alone = model.score_denoise(x[2:3], y[2:3], step_scale=1.3)
    assert torch.allclose(alone, ours[2:3], atol=1e-12, rtol=0)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="patch_size 3 does not divide img_size 4"):
        TarFlow.from_config({**TINY, "patch_size": 3})
    with pytest.raises(ConfigError, match="unknown key 'chanels'.*did you mean 'channels'"):
        TarFlow.from_config({**{k: v for k, v in TINY.items() if k != "channels"}, "chanels": 16})
    with pytest.raises(ConfigError, match="missing channels"):
        TarFlow.from_config({k: v for k, v in TINY.items() if k != "channels"})


# ---- saved formats -----------------------------------------------------------------------------


def test_folder_format_round_trips(tmp_path):
    model = random_tarflow()
    save_pretrained(model, tmp_path / "tf")
    assert sorted(p.name for p in (tmp_path / "tf").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(tmp_path / "tf", dtype=torch.float64)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(loaded(x, torch.tensor([0, 1]))[0], model(x, torch.tensor([0, 1]))[0])


def test_folder_format_refuses_bad_folders(tmp_path):
    with pytest.raises(StepbenchError, match="no config.json"):
        load_pretrained(tmp_path)
    save_pretrained(random_tarflow(), tmp_path / "tf")
    (tmp_path / "tf" / "config.json").write_text('{"in_channels": 1,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_pretrained(tmp_path / "tf")


def test_folder_weights_must_fit_the_config(tmp_path):
    save_pretrained(random_tarflow(), tmp_path / "tf")
    import json

    config = json.loads((tmp_path / "tf" / "config.json").read_text())
    (tmp_path / "tf" / "config.json").write_text(json.dumps({**config, "num_blocks": 3}))
    with pytest.raises(StepbenchError) as err:
        load_pretrained(tmp_path / "tf")
    message = str(err.value)
    assert "\n" not in message
    assert "missing blocks.2." in message and "refusing to sample with random weights" in message


def apple_pth(tmp_path, model: TarFlow, state=None):
    """A checkpoint as apple/ml-tarflow's train.py writes it: torch.save(model.state_dict(), path)."""
    path = tmp_path / "mnist_model_2_16_2_1_0.10.pth"
    torch.save(model.state_dict() if state is None else state, path)
    return path


def test_apple_checkpoint_needs_allow_pickle(tmp_path):
    path = apple_pth(tmp_path, random_tarflow())
    with pytest.raises(StepbenchError, match="pickled; set allow_pickle: true"):
        load_apple_checkpoint(path, TINY)


def test_apple_checkpoint_loads(tmp_path):
    model = random_tarflow()
    path = apple_pth(tmp_path, model)
    loaded = load_apple_checkpoint(path, TINY, allow_pickle=True, dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(loaded(x, torch.tensor([1, 2]))[0], model(x, torch.tensor([1, 2]))[0])


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_apple_checkpoint_is_read_with_weights_only(tmp_path):
    """A pickle that runs code when loaded is refused, and its code does not run."""
    marker = tmp_path / "pwned"
    state = dict(random_tarflow().state_dict())
    state["payload"] = _RunsCodeWhenUnpickled(marker)
    path = apple_pth(tmp_path, None, state=state)
    with pytest.raises(StepbenchError, match="not loadable with weights_only=True") as err:
        load_apple_checkpoint(path, TINY, allow_pickle=True)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    # the same file read as a plain pickle does run it: the payload is real
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("change, expected", [
    ("rename", "missing blocks.0.proj_in.weight; unexpected blocks.0.proj_in.w"),
    ("extra", "unexpected module.extra"),
    ("shape", "1 shape mismatches, e.g. blocks.0.pos_embed is [4, 8]"),
])
def test_apple_checkpoint_with_wrong_keys_is_refused_in_one_line(tmp_path, change, expected):
    state = dict(random_tarflow().state_dict())
    if change == "rename":
        state["blocks.0.proj_in.w"] = state.pop("blocks.0.proj_in.weight")
    elif change == "extra":
        state["module.extra"] = torch.zeros(1)
    else:
        state["blocks.0.pos_embed"] = torch.zeros(4, 8)
    path = apple_pth(tmp_path, None, state=state)
    with pytest.raises(StepbenchError) as err:
        load_apple_checkpoint(path, TINY, allow_pickle=True)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_apple_checkpoint_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "x.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(StepbenchError, match="expected a state dict of tensors"):
        load_apple_checkpoint(path, TINY, allow_pickle=True)
    with pytest.raises(StepbenchError, match="no such checkpoint file"):
        load_apple_checkpoint(tmp_path / "missing.pth", TINY, allow_pickle=True)


# ---- training ------------------------------------------------------------------------------------

SHORT_TRAINING = {
    "model": {**TINY, "img_size": 8, "patch_size": 2, "num_classes": 10},
    "steps": 6, "batch_size": 32, "warmup_steps": 2, "lr": 2e-3, "threads": 1,
}


def digits_subset(n=200):
    from harness.datasets import load_dataset

    images, labels = load_dataset("digits")
    return images[:n], labels[:n]


def test_training_is_deterministic():
    from harness.training.tarflow import train

    images, labels = digits_subset()
    first = train(SHORT_TRAINING, images, labels, seed=3, progress=False)
    second = train(SHORT_TRAINING, images, labels, seed=3, progress=False)
    other_seed = train(SHORT_TRAINING, images, labels, seed=4, progress=False)
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key
    assert any(not torch.equal(other_seed.state_dict()[k], v) for k, v in first.state_dict().items())
    # it trained: the output projections left their zero initialisation
    assert all(block.proj_out.weight.abs().max() > 0 for block in first.blocks)


def test_training_lowers_the_loss():
    from harness.training.tarflow import train

    images, labels = digits_subset()
    config = {**SHORT_TRAINING, "steps": 40, "warmup_steps": 5}
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels)
    untrained = train({**config, "steps": 1, "warmup_steps": 0, "lr": 1e-6, "min_lr": 1e-6}, images, labels,
                      seed=0, progress=False)
    trained = train(config, images, labels, seed=0, progress=False)
    with torch.no_grad():
        assert trained.nll_loss(x, y) < untrained.nll_loss(x, y) - 0.2


def test_training_restores_the_callers_settings():
    from harness.training.tarflow import train

    images, labels = digits_subset(64)
    threads, flag = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    train({**SHORT_TRAINING, "steps": 1, "warmup_steps": 0, "threads": 1}, images, labels, seed=0, progress=False)
    assert torch.rand(1) == expected_next
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, flag)


def test_training_config_errors():
    from harness.training.tarflow import train

    images, labels = digits_subset(64)
    with pytest.raises(ConfigError, match="unknown key 'step'"):
        train({**SHORT_TRAINING, "step": 3}, images, labels, seed=0, progress=False)
    with pytest.raises(ConfigError, match=r"training images are \[1, 8, 8\]"):
        train({**SHORT_TRAINING, "model": TINY}, images, labels, seed=0, progress=False)
