"""DINOv2 ViT features from a local weights file, for FD_DINOv2 (Stein et al. 2023) and any DINOv2 extractor.

torch-fidelity 0.4.0's FeatureExtractorDinoV2 gets its network only from `torch.hub.load("facebookresearch/dinov2",
...)`, which clones the dinov2 repository from GitHub (the code, not just the weights) and downloads the weights
into torch.hub's cache; its `feature_extractor_weights_path` branch raises NotImplementedError. A benchmark job must
not reach the network, so the network is built here instead and everything else is torch-fidelity's:
`FeatureExtractorDinoV2File` is torch-fidelity's extractor class with its `forward` unchanged (uint8 in, its
TF1-compatible bilinear resize to 224 x 224, ImageNet normalisation, the CLS features out as float32) and only its
constructor replaced, loading the file the hub would have downloaded (`dinov2_vitl14_pretrain.pth`, a plain state
dict) strictly into `DinoV2`.

`DinoV2` is the eval-mode forward of facebookresearch/dinov2's DinoVisionTransformer as hub/backbones.py builds the
LVD-142M backbones (patch 14, img_size 518, LayerScale, no registers, qkv bias, LayerNorm eps 1e-6, xFormers off as
torch-fidelity sets it): patch embedding, CLS token, position embeddings interpolated bicubically *with the
0.1 offset in the scale factor* (the original's `interpolate_offset`, which transformers' Dinov2Model omits, so its
features at 224 differ), pre-norm blocks, the final norm's CLS token. Parameter names are the original's, so the
file loads with strict=True and nothing is left random.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA, FeatureExtractorDinoV2
from torch_fidelity.helpers import text_to_dtype, vassert

from harness.errors import StepbenchError

DOWNLOAD_BASE = "https://dl.fbaipublicfiles.com/dinov2"  # dinov2/hub/utils.py _DINOV2_BASE_URL
FIDELITY_PREFIX = "stepbench-"  # the name this module's extractor is registered under with torch-fidelity
INTERPOLATE_OFFSET = 0.1  # hub/backbones.py's default for the LVD-142M backbones

# torch-fidelity's names -> (embed dim, depth, heads, ffn) of dinov2's vit_small/base/large/giant2
ARCHITECTURES = {
    "dinov2-vit-s-14": (384, 12, 6, "mlp"),
    "dinov2-vit-b-14": (768, 12, 12, "mlp"),
    "dinov2-vit-l-14": (1024, 24, 16, "mlp"),
    "dinov2-vit-g-14": (1536, 40, 24, "swiglu"),
}
assert set(ARCHITECTURES) == set(MODEL_METADATA)


def weights_filename(name: str) -> str:
    """The file torch.hub would download for torch-fidelity's extractor `name` (dinov2_vitl14_pretrain.pth)."""
    return f"{MODEL_METADATA[name]}_pretrain.pth"


def download_url(name: str) -> str:
    hub_name = MODEL_METADATA[name]
    return f"{DOWNLOAD_BASE}/{hub_name}/{hub_name}_pretrain.pth"


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    """dinov2's SwiGLUFFNFused (ViT-g): hidden width 2/3 of 4 x dim, rounded up to a multiple of 8."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.mlp = (_SwiGLU if ffn == "swiglu" else _Mlp)(dim, 4 * dim)
        self.ls1, self.ls2 = _LayerScale(dim), _LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """x: float [N, 3, H, W] (normalised) -> the final norm's CLS token [N, dim]."""

    def __init__(self, dim: int, depth: int, heads: int, ffn: str = "mlp", patch: int = 14, img_size: int = 518):
        super().__init__()
        self.patch = patch
        grid = img_size // patch
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # training only; in the file, so kept for strict loading
        self.blocks = nn.ModuleList(_Block(dim, heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @classmethod
    def of(cls, name: str, **kwargs) -> "DinoV2":
        dim, depth, heads, ffn = ARCHITECTURES[name]
        return cls(dim, depth, heads, ffn, **kwargs)

    def position_embeddings(self, tokens: int, h: int, w: int) -> torch.Tensor:
        """The original's interpolate_pos_encoding: bicubic, no antialias, scale (grid + 0.1) / M."""
        n = self.pos_embed.shape[1] - 1
        if tokens - 1 == n and h == w:
            return self.pos_embed
        pos = self.pos_embed.float()
        m = int(math.sqrt(n))
        h0, w0 = h // self.patch, w // self.patch
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h0 + INTERPOLATE_OFFSET) / m, (w0 + INTERPOLATE_OFFSET) / m),
                             mode="bicubic", antialias=False)
        if tuple(grid.shape[-2:]) != (h0, w0):
            raise StepbenchError(f"DINOv2: position embeddings interpolate to {tuple(grid.shape[-2:])}, not {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def forward(self, x):
        _, _, h, w = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embeddings(tokens.shape[1], h, w)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def load_dinov2(name: str, path: str | Path) -> DinoV2:
    """DinoV2 `name` with every weight from the state dict at `path` (strict: nothing missing, nothing left over)."""
    path = Path(path)
    if not path.is_file():
        raise StepbenchError(f"{path}: DINOv2 weights not found (download {download_url(name)})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise StepbenchError(f"{path}: not a readable DINOv2 state dict ({type(err).__name__})") from None
    model = DinoV2.of(name)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StepbenchError(f"{path}: the weights do not fit {name} ({first}); it must be {weights_filename(name)} "
                             f"from {download_url(name)}") from None
    return model


class FeatureExtractorDinoV2File(FeatureExtractorDinoV2):
    """torch-fidelity's DINOv2 extractor with the network loaded from `feature_extractor_weights_path`, never from
    torch.hub; registered as FIDELITY_PREFIX + torch-fidelity's name."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, feature_extractor_internal_dtype=None,
                 **kwargs):
        FeatureExtractorBase.__init__(self, name, features_list)  # not FeatureExtractorDinoV2's: it calls torch.hub
        vassert(feature_extractor_internal_dtype in ("float32", "float64", None),
                "Only 32-bit floats are supported for internal dtype of this feature extractor")
        base = name.removeprefix(FIDELITY_PREFIX)
        vassert(base in ARCHITECTURES, f"Model {name} not found; available models = {list(ARCHITECTURES)}")
        if feature_extractor_weights_path is None:
            raise StepbenchError(f"feature extractor {base!r} needs its weights file {weights_filename(base)} "
                                 f"(download {download_url(base)})")
        self.feature_extractor_internal_dtype = text_to_dtype(feature_extractor_internal_dtype, "float32")
        self.model = load_dinov2(base, feature_extractor_weights_path)
        self.to(self.feature_extractor_internal_dtype)
        self.requires_grad_(False)
        self.eval()
