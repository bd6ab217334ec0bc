"""Is a cell's number still the number of its samples?

cell.json records the sha256 of the samples.npz it describes, and metrics.json records the cell it was
computed from (the cell's config hash and samples hash). A cell is damaged when its files are missing,
unreadable or no longer match; its metrics are stale when they describe other samples. Damage is found
three times: while the workflow plans (harness.workflow marks the cell for recomputation), before
`stepbench evaluate` reads the samples, and when the report collects the results (a damaged or stale cell
shows as such, never with numbers).

Hashing a large cell takes a while, so hashes are remembered per file identity (size, mtime, ctime, inode):
rewriting a file, even with its old mtime restored, changes its ctime, so nothing is taken on trust.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness.errors import StepbenchError
from harness.files import read_json, sha256_file, write_json

_known: dict[str, tuple[tuple, str]] = {}  # path -> (identity, sha256), this process's memory


def _identity(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def file_sha256(path: str | Path) -> str:
    path = Path(path)
    identity = _identity(path)
    known = _known.get(str(path))
    if known is None or known[0] != identity:
        known = (identity, sha256_file(path))
        _known[str(path)] = known
    return known[1]


def load_hash_memory(path: Path) -> None:
    """Hashes remembered by an earlier run (only those whose file still has the same identity count)."""
    try:
        for name, (identity, digest) in json.loads(path.read_text()).items():
            _known.setdefault(name, (tuple(identity), digest))
    except (OSError, ValueError, TypeError):
        pass  # a missing or damaged memory only costs rehashing


def save_hash_memory(path: Path) -> None:
    write_json(path, {name: [list(identity), digest] for name, (identity, digest) in _known.items()})


def cell_damage(cell_dir: Path) -> str | None:
    """Why the cell's samples cannot be trusted, or None. A cell not yet sampled (no cell.json) is not damaged.
    Files are named relative to the cell folder."""
    cell_json, samples = cell_dir / "cell.json", cell_dir / "samples.npz"
    if not cell_json.exists():
        return None
    try:
        cell = read_json(cell_json)
    except StepbenchError as err:
        return _in_cell(err, cell_dir)
    recorded = cell.get("samples_sha256")
    if not samples.is_file():
        return "samples.npz is missing"
    if recorded is None:
        return "cell.json records no samples_sha256 (written before cells were hashed)"
    if file_sha256(samples) != recorded:
        return "samples.npz: its sha256 differs from the one cell.json records (damaged or replaced)"
    return None


def metrics_staleness(cell_dir: Path) -> tuple[str, str] | None:
    """("damaged" or "stale", why) when the cell's metrics.json is unreadable or does not describe its samples;
    None when it does, or when there is none."""
    if not (cell_dir / "metrics.json").exists():
        return None
    try:
        metrics = read_json(cell_dir / "metrics.json")
        cell = read_json(cell_dir / "cell.json")
    except StepbenchError as err:
        return "damaged", _in_cell(err, cell_dir)
    described = metrics.get("cell") or {}
    for key in ("samples_sha256", "config_hash"):
        ours = cell.get(key) if key == "samples_sha256" else cell.get("provenance", {}).get(key)
        if described.get(key) != ours:
            return "stale", f"metrics.json was computed from other samples than cell.json describes ({key} differs)"
    return None


def _in_cell(err: StepbenchError, cell_dir: Path) -> str:
    return str(err).replace(f"{cell_dir}/", "")


def verified_cell(cell_dir: Path) -> dict:
    """cell.json, once the samples it describes are checked; else one line naming the cell."""
    damage = cell_damage(cell_dir)
    if damage is None and not (cell_dir / "cell.json").exists():
        raise StepbenchError(f"{cell_dir / 'cell.json'}: file not found (run `stepbench sample` first)")
    if damage is not None:
        raise StepbenchError(f"cell {cell_dir}: {damage}; sample it again")
    return read_json(cell_dir / "cell.json")


def set_aside(path: Path, results_dir: Path, stamp: str) -> Path:
    """Move a damaged or stale output out of the way, to RESULTS/damaged/STAMP/<its place>: missing, it is what
    Snakemake recomputes (an older date would not do: Snakemake also compares inputs' checksums), and it is
    kept for inspection rather than deleted."""
    target = results_dir / "damaged" / stamp / path.relative_to(results_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return target
