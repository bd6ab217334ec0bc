"""The grid model x method x NFE: which cells run, and why the others cannot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.config import load_methods, load_models, load_yaml, lookup, validate
from harness.errors import ConfigError, UnsupportedNFE

DEFAULT_GRID_FILE = Path("profiles/default/grid.yaml")


@dataclass(frozen=True)
class GridCell:
    model: str
    method: str
    nfe: int
    supported: bool
    reason: str = ""  # why an unsupported cell cannot run
    guidance: float = 1.0  # classifier-free guidance scale (1: the conditional model alone)

    def path(self, results_dir: str | Path, seed: int) -> Path:
        return (Path(results_dir) / "cells" / self.model / self.method / f"nfe{self.nfe}{guidance_suffix(self.guidance)}"
                / f"seed{seed}")

    @property
    def key(self) -> tuple[str, str, int, float]:
        return self.model, self.method, self.nfe, self.guidance


def guidance_suffix(scale: float) -> str:
    """A guided cell's folder is nfeN-wS (nfe8-w4); an unguided one keeps plain nfeN."""
    return "" if float(scale) == 1 else f"-w{float(scale):g}"


def parse_guidance_suffix(suffix: str) -> float:
    return float(suffix[2:]) if suffix else 1.0


def check_grid(grid: dict, source: str | Path) -> None:
    """A ConfigError naming `source` and the first wrong key if `grid` breaks grid.schema.yaml."""
    validate(grid, "grid", source)


def load_grid(path: str | Path) -> dict:
    grid = load_yaml(path)
    check_grid(grid, path)
    return grid


def grid_seeds(grid: dict) -> list[int]:
    """Seeds every cell runs with: `seeds` if given, else the single `seed` (default 0)."""
    return list(grid.get("seeds") or [grid.get("seed", 0)])


def expand_grid(grid: dict, models: dict | None = None, methods: dict | None = None) -> list[GridCell]:
    """All cells of the grid (its main product, then each block's), each once, in order;
    models/methods default to the files the grid names."""
    from harness.methods import make_sampler

    models_file = grid.get("models_file", "models.yaml")
    methods_file = grid.get("methods_file", "methods.yaml")
    models = models if models is not None else load_models(models_file)
    methods = methods if methods is not None else load_methods(methods_file)
    cells: dict[tuple[str, str, int, float], GridCell] = {}
    for b, block in enumerate([grid, *grid.get("blocks", [])]):
        where = f"blocks.{b - 1}." if b else ""  # the grid key an id comes from, for the error line
        model_key = f"{where}models" if "models" in block else "models"
        scales = [float(w) for w in block.get("guidance", [1])]  # a block's own, not the grid's: 1 unless given
        for i, model_id in enumerate(block.get("models", grid["models"])):
            model = _grid_lookup(models, model_id, models_file, "model", f"{model_key}.{i}")
            for j, method_id in enumerate(block["methods"]):
                sampler = make_sampler(_grid_lookup(methods, method_id, methods_file, "method", f"{where}methods.{j}"))
                for nfe in block["nfe"]:
                    for scale in scales:
                        if (model_id, method_id, nfe, scale) in cells:
                            continue
                        reason = _unsupported(sampler, nfe, scale, model)
                        cell = GridCell(model_id, method_id, nfe, reason is None, reason or "", scale)
                        cells[cell.key] = cell
    return list(cells.values())


def _unsupported(sampler, nfe: int, scale: float, model: dict) -> str | None:
    """Why a cell cannot run, or None."""
    from harness.models import FLOW_ADAPTERS, guidance_refusal

    if scale != 1 and not model.get("classes") and not model.get("prompts"):  # class- or text-conditional
        return "unconditional model: no guidance"
    if scale != 1 and model["adapter"] in FLOW_ADAPTERS:  # TarFlow's guidance (on a, b) is not the grid's yet
        return "flow model: no guidance axis yet"
    if scale != 1 and (reason := guidance_refusal(model)):
        return reason
    try:
        sampler.check_nfe(nfe)
        sampler.check_model(nfe, model)
    except UnsupportedNFE as err:
        return err.reason
    return None


def _grid_lookup(table: dict, item_id: str, path, what: str, grid_key: str) -> dict:
    """`lookup`, its error line led by the grid key that names the id."""
    try:
        return lookup(table, item_id, path, what)
    except ConfigError as err:
        raise ConfigError(f"grid key '{grid_key}': {err}") from None
