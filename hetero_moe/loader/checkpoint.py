"""Safetensors checkpoints, single-file or sharded, read lazily.

Opening reads only the headers: every tensor's name, dtype and shape, and whether each shard is
complete, so a bad checkpoint fails before a single weight is loaded.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
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
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = list(dict.fromkeys(weight_map.values()))
        elif (directory / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")

        tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {INDEX} is missing")
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


def _read_header(path: Path) -> list[TensorInfo]:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    data_size = size - 8 - header_len
    infos = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        dtype = DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {meta.get('dtype')!r}")
        shape = torch.Size(meta["shape"])
        begin, end = meta["data_offsets"]
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key} ends at byte {end} of the data, which holds only {data_size}"
            )
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {key} holds {end - begin} bytes, its shape needs {expected}")
        infos.append(TensorInfo(key, path, dtype, shape, end - begin, 8 + header_len + begin))
    infos.sort(key=lambda i: header[i.key]["data_offsets"][0])
    return infos
