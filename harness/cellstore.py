"""Where a cell's batches go while it samples: into memory (short work), or onto disk as they finish.

On disk (`PartialCell`), each array is a preallocated .npy file filled batch by batch through a memory map,
and a record of the finished batches is rewritten atomically after each one. So a long cell (50k samples on a
GPU) neither holds its samples in memory nor loses its finished batches when it is killed: sampled again with
the same key (config hash, batch size), it skips them and gives the samples an uninterrupted run gives, since
sample i depends only on (seed, i). The finished cell's samples.npz is assembled from those files by
streaming them into the archive (numpy's uncompressed .npz layout), then the partial folder is removed.

`NpzArray` reads an array of such an archive in row ranges, so metrics can stream over a cell too.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np

from harness.files import atomic_path, write_json


class MemoryStore:
    """Batches kept in memory, concatenated at the end (references, tests, small work)."""

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {}
        self.records: dict[int, dict] = {}

    def finished(self) -> dict[int, dict]:
        return self.records

    def add(self, start: int, arrays: dict[str, np.ndarray], record: dict) -> None:
        for name, array in arrays.items():
            self.parts.setdefault(name, []).append(array)
        self.records[start] = record

    def array(self, name: str) -> np.ndarray | None:
        return np.concatenate(self.parts[name]) if name in self.parts else None


class PartialCell:
    """Batches written into preallocated .npy files under CELL/.partial, resumable after a kill.

    Plain file writes at the batch's offset, not a memory map: mapped pages would count in the process's
    resident memory, which should not grow with the number of samples."""

    def __init__(self, cell_dir: Path, key: dict, num_samples: int, folder: str = ".partial"):
        self.dir = Path(cell_dir) / folder
        self.num_samples = num_samples
        self.key = {**key, "num_samples": num_samples}
        state = self._read_state()
        if state is None or state["key"] != self.key:  # none, or made for other settings: start afresh
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            state = {"key": self.key, "arrays": {}, "batches": {}}
        self.state = state

    def _read_state(self) -> dict | None:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def finished(self) -> dict[int, dict]:
        return {int(start): record for start, record in self.state["batches"].items()}

    def _file(self, name: str, row_shape: tuple[int, ...]) -> tuple[Path, int, int]:
        """(path, offset of the data, bytes per row) of an array's .npy file, created full-size if new."""
        path = self.dir / f"{name}.npy"
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * 4
        if name not in self.state["arrays"]:
            with open(path, "wb") as handle:
                np.lib.format.write_array_header_2_0(handle, {"descr": "<f4", "fortran_order": False,
                                                              "shape": (self.num_samples, *row_shape)})
                offset = handle.tell()
                handle.truncate(offset + row_bytes * self.num_samples)
            self.state["arrays"][name] = {"row_shape": list(row_shape), "offset": offset}
        return path, self.state["arrays"][name]["offset"], row_bytes

    def add(self, start: int, arrays: dict[str, np.ndarray], record: dict) -> None:
        for name, array in arrays.items():
            path, offset, row_bytes = self._file(name, tuple(array.shape[1:]))
            with open(path, "r+b") as handle:
                handle.seek(offset + start * row_bytes)
                handle.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
        self.state["batches"][str(start)] = record
        write_json(self.dir / "state.json", self.state)  # after the data: a batch listed is a batch on disk

    def array(self, name: str) -> np.ndarray | None:
        """A read-only memory map of the array (None if the cell has no such array)."""
        return np.load(self.dir / f"{name}.npy", mmap_mode="r") if name in self.state["arrays"] else None

    def write_npz(self, path: Path, names: list[str], small: dict[str, np.ndarray] | None = None) -> None:
        """The cell's samples.npz, streamed from the .npy files (as np.savez lays it out: stored, not deflated),
        with `small` arrays (e.g. a JSON recipe) beside them."""
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name in names:
                if name in self.state["arrays"]:
                    archive.write(self.dir / f"{name}.npy", arcname=f"{name}.npy")
            for name, value in (small or {}).items():
                buffer = io.BytesIO()
                np.save(buffer, np.asarray(value), allow_pickle=False)
                archive.writestr(f"{name}.npy", buffer.getvalue())

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class NpzArray:
    """One array of an .npz archive, read in row ranges by plain file reads when it is stored uncompressed (as
    np.savez and PartialCell write it), so a metric can stream over a cell; loaded whole otherwise. Arrays of
    Python objects are refused: nothing is unpickled."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = Path(path), name
        with zipfile.ZipFile(self.path) as archive:
            info = archive.getinfo(f"{name}.npy")
            stored = info.compress_type == zipfile.ZIP_STORED
        if not stored:
            with np.load(self.path, allow_pickle=False) as data:
                self._whole = data[name]
            self.shape, self.dtype, self.offset = self._whole.shape, self._whole.dtype, None
            return
        self._whole = None
        with open(self.path, "rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(30)
            if local[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"{self.path}: bad local header for {name}.npy")
            name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            handle.seek(info.header_offset + 30 + name_length + extra_length)
            major, _ = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if dtype.hasobject or fortran:
            raise ValueError(f"{self.path}: {name}.npy holds Python objects or Fortran order; refused")
        self.shape, self.dtype = tuple(shape), dtype

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, len(self))
        if self._whole is not None:
            return self._whole[start:stop]
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        with open(self.path, "rb") as handle:
            handle.seek(self.offset + start * row * self.dtype.itemsize)
            data = handle.read((stop - start) * row * self.dtype.itemsize)
        return np.frombuffer(bytearray(data), dtype=self.dtype).reshape(stop - start, *self.shape[1:])  # writable

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            yield self.rows(start, start + size)

    def load(self) -> np.ndarray:
        return self._whole if self._whole is not None else self.rows(0, len(self))

    def __array__(self, dtype=None, copy=None):
        array = self.load()
        return array if dtype is None else array.astype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)


STREAM_ROWS = 1024  # rows a metric reads at a time


def row_chunks(array, size: int = STREAM_ROWS):
    """Consecutive row blocks of an ndarray or an NpzArray."""
    if isinstance(array, NpzArray):
        yield from array.chunks(size)
        return
    for start in range(0, len(array), size):
        yield array[start:start + size]
