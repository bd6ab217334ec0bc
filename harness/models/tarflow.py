"""TarFlow (Zhai et al. 2024, "Normalizing Flows are Capable Generative Models"; apple/ml-tarflow,
transformer_flow.py): a normalizing flow made of causal-transformer autoregressive blocks.

The image [B, C, H, W] is patchified into T = (H/p)(W/p) tokens of size D = C p^2. Each of the
`num_blocks` MetaBlocks reads the tokens in its own order (identity for even blocks, flipped for odd
ones) and maps x -> z token by token,

    z_i = (x_i - b_i) * exp(-a_i),    (a_i, b_i) = transformer(x_<i)    (a_0 = b_0 = 0),

so the Jacobian is triangular and log|det dz/dx| = -sum_i a_i. The prior is N(0, var) with var = 1 for
the non-volume-preserving (`nvp`) flows all public checkpoints are. Sampling inverts the blocks last
to first; harness.methods.jacobi_inverse holds the inversion algorithms, this module the pieces they
need: `MetaBlock.transform` (a, b for the tokens after given ones, through an optional `KVCache`),
`MetaBlock.permute`, `TarFlow.prior_tokens` and `TarFlow.score_denoise` (TarFlow's last sampling
step: the model trains on data + N(0, noise_std^2), so one gradient step x + noise_std^2 grad log p(x)
denoises a sample, Tweedie's formula with the model's own score).

Parameter names, shapes and initialisation order are apple/ml-tarflow's `Model`, so one of its state
dicts loads here unchanged (`load_apple_checkpoint`). Differences that change no number in float32:
layer norms run in the input dtype (apple casts to float32 first, which makes its code unusable in
float64), attention always goes through scaled_dot_product_attention with an explicit boolean mask,
the guidance pair (conditional, unconditional) runs as one batch of 2B rows, and the log-determinant
is the sum over all dimensions (apple's `logdets` is divided by T D; `nll_loss` is apple's loss).

Checked side by side with apple/ml-tarflow (313120e, transformer_flow.Model, run outside the
repository) on a random conditional model (img 8, patch 2, 4 blocks x 2 layers, 64 channels, 3
classes, proj_out ~ N(0, 0.02^2)) loaded with the same state dict, 8 samples: in float32 with apple's
file unmodified the forward map z is bit-identical, our log-determinant / (T D) is apple's `logdets`
to 3e-8, and the denoising step is bit-identical to evaluate_fid.py's x - lr grad(loss) with
lr = B H W C noise_std^2; in float64 (apple's .float() casts removed) z agrees to 1.1e-15, the
log-determinant to 8e-17, the denoising step to 8.9e-16. On the trained digits-tarflow the same
(float32: z and the denoising step bit-identical; float64: z 1.2e-14, log-determinant 2.2e-16,
denoising step 1.3e-15). The inverses: harness.methods.jacobi_inverse.

Saved formats:
- ours: a folder with config.json (the constructor's arguments) and model.safetensors (the state
  dict), like diffusers' save_pretrained (`save_pretrained`, `load_pretrained`);
- apple/ml-tarflow's: a pickled `.pth` state dict without its config, which the models.yaml entry has
  to state. Pickles run code when loaded, so it is read only when the caller passes
  allow_pickle=True, and then with torch.load(weights_only=True).
Either way a state dict whose keys or shapes do not all match the config is refused in one line:
nothing is ever sampled with random weights.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.errors import ConfigError, StepbenchError, valid_names

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TarFlowConfig:
    """The constructor's arguments; apple/ml-tarflow's Model takes the same (head_dim and expansion
    are fixed at 64 and 4 there)."""

    in_channels: int
    img_size: int
    patch_size: int
    channels: int
    num_blocks: int
    layers_per_block: int
    head_dim: int = 64
    expansion: int = 4
    nvp: bool = True
    num_classes: int = 0
    noise_std: float = 0.0  # training noise augmentation; the step size of score_denoise is its square

    @classmethod
    def from_dict(cls, config: dict, where: str = "TarFlow config") -> "TarFlowConfig":
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}{valid_names(unknown[0], names)}")
        missing = [f.name for f in fields(cls) if f.name not in config and f.default is MISSING]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        cfg = cls(**config)
        cfg.check(where)
        return cfg

    def check(self, where: str = "TarFlow config") -> None:
        for name in ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "layers_per_block",
                     "head_dim", "expansion"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}: {name} must be a positive integer, not {value!r}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"{where}: patch_size {self.patch_size} does not divide img_size {self.img_size}")
        if self.channels % self.head_dim:
            raise ConfigError(f"{where}: head_dim {self.head_dim} does not divide channels {self.channels}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"{where}: num_classes must be an integer >= 0, not {self.num_classes!r}")
        if not isinstance(self.noise_std, (int, float)) or self.noise_std < 0:
            raise ConfigError(f"{where}: noise_std must be a number >= 0, not {self.noise_std!r}")

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2


def _norm(layer_norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """Layer norm in float32 for half-precision inputs (apple's choice), in the input dtype otherwise."""
    if x.dtype in LOW_PRECISION:
        return layer_norm(x.float()).type(x.dtype)
    return layer_norm(x)


class KVCache:
    """Keys and values of the tokens a block has already produced, for each of its attention layers.

    `length` tokens are committed. A call through `MetaBlock.transform` writes the keys and values of
    its m new tokens at [length, length + m) and attends to [0, length + m); calling again overwrites
    them (the iterations of a Jacobi module), and `commit(m)` keeps them. Buffers are allocated once
    at full length (rows x heads x T x head_dim), so extending costs no concatenation. `rows` picks the
    batch rows a call works on (samples still iterating); the others keep what they had.
    """

    def __init__(self, num_rows: int, capacity: int):
        self.num_rows, self.capacity = num_rows, capacity
        self.length = 0
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None):
        n, m = self.length, k.shape[2]
        if n + m > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; asked for {n + m}")
        if layer not in self._k:
            shape = (self.num_rows, k.shape[1], self.capacity, k.shape[3])
            self._k[layer] = k.new_zeros(shape)
            self._v[layer] = v.new_zeros(shape)
        kb, vb = self._k[layer], self._v[layer]
        if rows is None:
            kb[:, :, n:n + m] = k
            vb[:, :, n:n + m] = v
            return kb[:, :, :n + m], vb[:, :, :n + m]
        kb[rows, :, n:n + m] = k
        vb[rows, :, n:n + m] = v
        return kb[rows, :, :n + m], vb[rows, :, :n + m]

    def commit(self, m: int) -> None:
        self.length += m


class Attention(nn.Module):
    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, channels * 3)
        self.proj = nn.Linear(channels, channels)
        self.num_heads = channels // head_channels
        self.head_channels = head_channels

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0, rows=None, temp=None):
        B, M, C = x.shape
        # [B, M, 3C] -> [B, 3 heads, M, d] -> q, k, v: the channel layout of apple's qkv weights
        q, k, v = self.qkv(_norm(self.norm, x)).reshape(B, M, 3 * self.num_heads, -1).transpose(1, 2).chunk(3, dim=1)
        if temp is not None:  # attention temperature per row (guidance's unconditional half): q / temp
            q = q / temp
        if cache is not None:
            k, v = cache.extend(layer, k, v, rows)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_channels ** -0.5)
        return self.proj(out.transpose(1, 2).reshape(B, M, C))


class MLP(nn.Module):
    def __init__(self, channels: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.main = nn.Sequential(nn.Linear(channels, channels * expansion), nn.GELU(),
                                  nn.Linear(channels * expansion, channels))

    def forward(self, x):
        return self.main(_norm(self.norm, x))


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, head_channels: int, expansion: int):
        super().__init__()
        self.attention = Attention(channels, head_channels)
        self.mlp = MLP(channels, expansion)

    def forward(self, x, mask=None, cache=None, layer=0, rows=None, temp=None):
        x = x + self.attention(x, mask, cache, layer, rows, temp)
        return x + self.mlp(x)


class MetaBlock(nn.Module):
    """One autoregressive flow block. It works in its own token order: `permute` maps the model's order
    to it and back (a flip is its own inverse)."""

    attn_mask: torch.Tensor

    def __init__(self, token_dim: int, channels: int, num_tokens: int, flip: bool, num_layers: int,
                 head_dim: int, expansion: int, nvp: bool, num_classes: int):
        super().__init__()
        # created in apple's order, so a seed gives apple's initial weights too
        self.proj_in = nn.Linear(token_dim, channels)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, channels) * 1e-2)
        if num_classes:
            self.class_embed = nn.Parameter(torch.randn(num_classes, 1, channels) * 1e-2)
        else:
            self.register_parameter("class_embed", None)
        self.attn_blocks = nn.ModuleList(AttentionBlock(channels, head_dim, expansion) for _ in range(num_layers))
        self.nvp = nvp
        self.proj_out = nn.Linear(channels, token_dim * 2 if nvp else token_dim)
        self.proj_out.weight.data.fill_(0.0)  # starts as the identity map
        self.flip = flip
        # unused here (masks are built per call) but part of apple's state dict
        self.register_buffer("attn_mask", torch.tril(torch.ones(num_tokens, num_tokens)))

    def permute(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x.flip(dims=[dim]) if self.flip else x

    def _class_term(self, y: torch.Tensor | None) -> torch.Tensor | int:
        """The class embedding added to every token; labels < 0 (dropped, or the unconditional half of
        guidance) and y = None get the mean embedding, as apple's model trains and samples."""
        if self.class_embed is None:
            if y is not None and bool((y >= 0).any()):
                raise StepbenchError("this TarFlow is unconditional (num_classes 0) but got class labels")
            return 0
        mean = self.class_embed.mean(dim=0)
        if y is None:
            return mean
        if bool((y >= self.class_embed.shape[0]).any()):
            raise StepbenchError(f"class label {int(y.max())} out of range for a TarFlow with "
                                 f"{self.class_embed.shape[0]} classes")
        dropped = (y < 0).view(-1, 1, 1)
        return torch.where(dropped, mean, self.class_embed[y.clamp(min=0)])

    def transform(self, x: torch.Tensor, y: torch.Tensor | None = None, cache: KVCache | None = None,
                  rows: torch.Tensor | None = None, temp: torch.Tensor | None = None):
        """(a, b) predicted from tokens x [B, m, D] in this block's order: row j of the output is the
        log-scale and shift of the token after x's j-th, i.e. of token start + j + 1 with
        start = cache.length (0 without a cache). With a cache the tokens attend to the cached ones
        before them; their own keys and values are written to it (pending until cache.commit)."""
        start = cache.length if cache is not None else 0
        m = x.shape[1]
        pos = self.permute(self.pos_embed, dim=0)[start:start + m]
        h = self.proj_in(x) + pos + self._class_term(y)
        # token j attends to keys 0 .. start + j; a single new token sees everything cached
        mask = None if m == 1 else torch.ones(m, start + m, dtype=torch.bool, device=x.device).tril(start)
        for layer, block in enumerate(self.attn_blocks):
            h = block(h, mask, cache, layer, rows, temp)
        out = self.proj_out(h)
        if self.nvp:
            a, b = out.chunk(2, dim=-1)
        else:
            a, b = torch.zeros_like(out), out
        return a, b

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> z (both in the model's token order) and log|det dz/dx| per sample."""
        xp = self.permute(x)
        a, b = (shift_one_token(t) for t in self.transform(xp, y))
        z = (xp - b) * torch.exp(-a)
        return self.permute(z), -a.sum(dim=(1, 2))


def shift_one_token(t: torch.Tensor) -> torch.Tensor:
    """[B, T, D] outputs indexed by the token they were computed from -> indexed by the token they are
    for: token 0 gets zeros (a_0 = b_0 = 0), the last output is dropped."""
    return torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1)


class TarFlow(nn.Module):
    var: torch.Tensor

    def __init__(self, in_channels: int, img_size: int, patch_size: int, channels: int, num_blocks: int,
                 layers_per_block: int, head_dim: int = 64, expansion: int = 4, nvp: bool = True,
                 num_classes: int = 0, noise_std: float = 0.0):
        super().__init__()
        self.config = TarFlowConfig(in_channels, img_size, patch_size, channels, num_blocks, layers_per_block,
                                    head_dim, expansion, nvp, num_classes, noise_std)
        self.config.check()
        T, D = self.config.num_tokens, self.config.token_dim
        self.blocks = nn.ModuleList(
            MetaBlock(D, channels, T, i % 2 == 1, layers_per_block, head_dim, expansion, nvp, num_classes)
            for i in range(num_blocks))
        # prior variance: ones for nvp flows; apple learns it for the volume-preserving variant
        self.register_buffer("var", torch.ones(T, D))

    @classmethod
    def from_config(cls, config: dict, where: str = "TarFlow config") -> "TarFlow":
        return cls(**asdict(TarFlowConfig.from_dict(config, where)))

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    @property
    def data_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.img_size, c.img_size)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, T, C p^2], patches in raster order, channels outermost (F.unfold)."""
        p = self.config.patch_size
        return F.unfold(x, p, stride=p).transpose(1, 2)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, size = self.config.patch_size, self.config.img_size
        return F.fold(x.transpose(1, 2), (size, size), p, stride=p)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [B, C, H, W] -> latent tokens z [B, T, D] and log|det dz/dx| [B] (summed over blocks)."""
        x = self.patchify(x)
        logdet = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, block_logdet = block(x, y)
            logdet = logdet + block_logdet
        return x, logdet

    def log_prob(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x) [B] up to the constant of the unit Gaussian prior."""
        z, logdet = self(x, y)
        return -0.5 * z.pow(2).sum(dim=(1, 2)) + logdet

    def nll_loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """apple's training loss: 0.5 mean z^2 - mean log|det| / (T D), the NLL per dimension."""
        z, logdet = self(x, y)
        return 0.5 * z.pow(2).mean() - logdet.mean() / (self.num_tokens * self.token_dim)

    def prior_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like the data [B, C, H, W] -> the prior's latent tokens [B, T, D]."""
        return self.patchify(z) * self.var.sqrt()

    def score_denoise(self, x: torch.Tensor, y: torch.Tensor | None = None, step_scale: float = 1.0) -> torch.Tensor:
        """TarFlow's final denoising step: x + step_scale * noise_std^2 * grad_x log p(x | y), one
        forward and backward pass (apple's self_denoising_lr is step_scale). Each sample's gradient is
        its own, so the result does not depend on the batch."""
        step = step_scale * self.config.noise_std**2
        if step == 0:
            return x
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(x, y).sum(), [x])
        return (x + step * grad).detach()


# ---- saving and loading -------------------------------------------------------------------------


def save_pretrained(model: TarFlow, folder: str | Path) -> Path:
    """config.json + model.safetensors in `folder` (created), like diffusers' save_pretrained."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "model": "tarflow"})
    return folder


def load_pretrained(folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> TarFlow:
    """A TarFlow saved by save_pretrained; a missing file, a bad config or weights that do not all fit
    are one-line errors."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise StepbenchError(f"{folder}: not a TarFlow folder (no {path.name}; expected {CONFIG_NAME} and "
                                 f"{WEIGHTS_NAME}, written by save_pretrained)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: expected a JSON object of TarFlow arguments")
    model = TarFlow.from_config(config, where=str(config_path)).to(dtype)  # before loading: no rounding
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # a truncated or foreign file: say which, not the library's traceback
        raise StepbenchError(f"{weights_path}: not a readable safetensors file ({type(err).__name__})") from None
    load_state_dict_checked(model, state, str(weights_path))
    return model.to(device).eval()


def load_apple_checkpoint(path: str | Path, config: dict, *, allow_pickle: bool = False,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TarFlow:
    """An apple/ml-tarflow `.pth` state dict (torch.save(model.state_dict())) with the config that made
    it (the file carries none: in_channels, img_size, patch_size, channels, num_blocks,
    layers_per_block, num_classes, noise_std, as the reference scripts' arguments)."""
    path = Path(path)
    if not allow_pickle:
        raise StepbenchError(f"{path}: apple/ml-tarflow checkpoints are pickled; set allow_pickle: true in the "
                             "models.yaml entry to read it (with torch.load(weights_only=True))")
    if not path.is_file():
        raise StepbenchError(f"{path}: no such checkpoint file")
    model = TarFlow.from_config(config, where=f"{path} config").to(dtype)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise StepbenchError(f"{path}: not loadable with weights_only=True ({type(err).__name__}"
                             f"{': ' + first[:200] if first else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StepbenchError(f"{path}: expected a state dict of tensors (torch.save(model.state_dict())), "
                             f"got {type(state).__name__}")
    load_state_dict_checked(model, state, str(path))
    return model.to(device).eval()


def load_state_dict_checked(model: TarFlow, state: dict, where: str) -> None:
    """Load `state` into `model` only if every key is there with its shape, and nothing else is."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shape mismatches, e.g. {k} is {list(state[k].shape)} where the config "
                        f"makes {list(expected[k].shape)}")
    if problems:
        raise StepbenchError(f"{where}: weights do not fit the TarFlow config ({'; '.join(problems)}); "
                             "refusing to sample with random weights")
    for k, mask in state.items():
        if k.endswith("attn_mask") and not torch.equal(mask.bool(), torch.ones_like(mask).tril().bool()):
            raise StepbenchError(f"{where}: {k} is not the causal mask a TarFlow block uses")
    model.load_state_dict(state, strict=True)


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
