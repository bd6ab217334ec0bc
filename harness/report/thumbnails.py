"""Samples you can see: per cell a grid of its first GRID samples and its first sample alone (image models), or
players for its first AUDIO waveforms (audio models), written from samples.npz by the report job.

Sample i of every method of a model starts from the same noise, so the first samples of two methods are the
same draw under two samplers: the strips of first samples show what a method changes, not luck.
Only the first rows of samples.npz are read (uncompressed archives are read in row ranges).
"""

from __future__ import annotations

import io
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from harness.cellstore import NpzArray
from harness.files import atomic_path
from harness.metrics.features import IMAGE_DATA_RANGE

GRID = 16  # samples per cell grid (4 x 4)
AUDIO = 3  # players per cell
TILE = 48  # pixels a sample's tile aims at (small images are enlarged by whole factors, large ones shrunk)
DEFAULT_SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Thumbnails:
    kind: str  # "image" or "audio"
    grid: str | None = None  # path inside the site
    first: str | None = None
    audio: tuple[str, ...] = ()


def thumbnail_name(cell_dir: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", cell_dir.strip("/"))


def write_thumbnails(samples_npz: Path, out_dir: Path, name: str, model_spec: dict) -> Thumbnails | None:
    """Thumbnails of one cell under out_dir (site-relative names returned with out_dir's last part); None when
    the samples are neither images nor audio, or cannot be shown (missing, non-finite)."""
    try:
        samples = NpzArray(samples_npz, "samples")
    except (OSError, KeyError, ValueError):
        return None
    shape = samples.shape
    if len(shape) == 4 and shape[1] in (1, 3):
        first = np.asarray(samples.rows(0, GRID), dtype=np.float64)
        if not np.isfinite(first).all():
            return None
        tiles = _to_uint8(first)
        grid_file, first_file = f"{name}__grid.png", f"{name}__first.png"
        _save_png(_grid_image(tiles), out_dir / grid_file)
        _save_png(_tile(tiles[0]), out_dir / first_file)
        return Thumbnails("image", f"{out_dir.name}/{grid_file}", f"{out_dir.name}/{first_file}")
    if len(shape) == 2 or (len(shape) == 3 and shape[1] == 1):
        waves = np.asarray(samples.rows(0, AUDIO), dtype=np.float64).reshape(min(AUDIO, shape[0]), -1)
        if not np.isfinite(waves).all():
            return None
        rate = int(model_spec.get("sample_rate", DEFAULT_SAMPLE_RATE))
        files = []
        for i, waveform in enumerate(waves):
            file = f"{name}__audio{i}.wav"
            _save_wav(waveform, rate, out_dir / file)
            files.append(f"{out_dir.name}/{file}")
        return Thumbnails("audio", audio=tuple(files))
    return None


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] in the image data range -> uint8 [N, H, W, C] (C = 1 or 3), as the image metrics see them."""
    lo, hi = IMAGE_DATA_RANGE
    pixels = np.clip(np.round((images - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    return pixels.transpose(0, 2, 3, 1)


def _tile(pixels: np.ndarray) -> Image.Image:
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    height = pixels.shape[0]
    if height < TILE:  # small images: whole-factor nearest-neighbour enlargement keeps the pixels honest
        factor = max(1, TILE // height)
        return image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    scale = TILE / height
    return image.resize((max(1, round(image.width * scale)), TILE), Image.LANCZOS)


def _grid_image(tiles: np.ndarray, columns: int = 4, gap: int = 2) -> Image.Image:
    images = [_tile(t) for t in tiles]
    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new(images[0].mode, (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap),
                      color=255 if images[0].mode == "L" else (255, 255, 255))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * (width + gap), (i // columns) * (height + gap)))
    return sheet


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _save_wav(waveform: np.ndarray, rate: int, path: Path) -> None:
    peak = float(np.abs(waveform).max()) or 1.0
    pcm = (np.clip(waveform / max(peak, 1.0), -1, 1) * 32767).astype("<i2")  # louder than full scale: scaled down
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
