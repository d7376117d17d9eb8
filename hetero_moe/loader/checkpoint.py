"""Safetensors checkpoints, single-file or sharded, read lazily.

Opening reads only the headers: every tensor's name, dtype and shape, and whether each shard is
complete, so a bad checkpoint fails before a single weight is loaded.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
SINGLE = "model.safetensors"

DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "I16": torch.int16,
}
NUMPY_DTYPES = {torch.uint8: np.uint8, torch.uint16: np.uint16, torch.int16: np.int16, torch.float32: np.float32}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor and the file."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: torch.dtype
    shape: torch.Size
    nbytes: int
    offset: int  # of the tensor's first byte in the file


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    tensors: dict[str, TensorInfo]  # in file order, then header order

    @classmethod
    def open(cls, directory: str | Path) -> Checkpoint:
        directory = Path(directory)
        index = directory / INDEX
        if index.is_file():
            weight_map = _read_index(index)
            files = list(dict.fromkeys(weight_map.values()))
        elif (directory / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")

        tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = _inside(directory, name, index if weight_map is not None else directory / SINGLE)
            for info in _read_header(path):
                if weight_map is not None and weight_map.get(info.key) != name:
                    raise CheckpointError(f"{path}: tensor {info.key} is not listed for this shard in {INDEX}")
                tensors[info.key] = info
        if weight_map is not None:
            absent = [k for k in weight_map if k not in tensors]
            if absent:
                raise CheckpointError(
                    f"{index}: {len(absent)} tensor(s) listed but not in their shard, e.g. "
                    f"{absent[0]} in {weight_map[absent[0]]}"
                )
        return cls(directory, tensors)

    def read(self, keys: list[str]) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Yield tensors one at a time, file by file, in the order given within each file."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        for path, file_keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for key in file_keys:
                    yield self.tensors[key], f.get_tensor(key)


def read_header(path: Path) -> list[TensorInfo]:
    """Every tensor of one safetensors file, checked against the file's size; reads no data."""
    return _read_header(path)


def memory_map(info: TensorInfo) -> np.ndarray:
    """A read-only numpy view of one tensor, straight from the page cache (uint8/uint16/float32...)."""
    dtype = NUMPY_DTYPES[info.dtype]
    return np.memmap(info.file, dtype=dtype, mode="r", offset=info.offset, shape=tuple(info.shape))


def prefault(path: Path, arrays: Iterable[np.ndarray]) -> None:
    """Read `path` into the page cache (one readahead request for the whole file) and map every page of
    `arrays`, memory-mapped from it, into this process, so that no decode step waits on a page fault."""
    with path.open("rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
    for a in arrays:
        pages = a.reshape(-1).view(np.uint8)[:: mmap.PAGESIZE]
        np.bitwise_or.reduce(pages)  # one byte a page: the faults map the rest of each page


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: not a valid safetensors index (expected 'weight_map': {{tensor: file name}})")
    return weight_map


def _inside(directory: Path, name: str, listed_in: Path) -> Path:
    """The shard `name`, which must be a file inside the model directory: no absolute paths, no `..`, and no
    symbolic link leading out of it (except, for a Hugging Face cache snapshot, into the cache's own blobs)."""
    path = directory / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{listed_in}: shard {name!r} is outside the model directory")
    root = directory.resolve()
    if root.parent.name == "snapshots":  # models--org--name/snapshots/<revision>/ links to ../../blobs/<hash>
        root = root.parent.parent
    real = path.resolve()
    if not real.is_relative_to(root):
        raise CheckpointError(f"{path}: a link to {real}, outside the model directory; refused")
    if not real.is_file():
        raise CheckpointError(f"{path}: shard listed in {listed_in.name} is missing")
    return path


def _read_header(path: Path) -> list[TensorInfo]:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {header_len} bytes)")
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header of {header_len} bytes; safetensors allows {MAX_HEADER_BYTES}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a {type(header).__name__}, not an object)")
    data_size = size - 8 - header_len
    infos = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        infos.append(_tensor_info(path, key, meta, data_size, 8 + header_len))
    infos.sort(key=lambda i: i.offset)
    return infos


def _tensor_info(path: Path, key: str, meta: object, data_size: int, data_start: int) -> TensorInfo:
    """One header entry, checked: `{"dtype": str, "shape": [int >= 0, ...], "data_offsets": [begin, end]}`."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} {what}")

    if not isinstance(meta, dict):
        raise bad(f"is a {type(meta).__name__}, not an object")
    dtype = DTYPES.get(meta.get("dtype")) if isinstance(meta.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {meta.get('dtype')!r}")
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"has data_offsets {offsets!r}: negative or reversed")
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor {key} ends at byte {end} of the data, which holds only {data_size}"
        )
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != expected:
        raise CheckpointError(f"{path}: tensor {key} holds {end - begin} bytes, its shape needs {expected}")
    return TensorInfo(key, path, dtype, torch.Size(shape), end - begin, data_start + begin)
