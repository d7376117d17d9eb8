"""GGUF files (llama.cpp's format), one file or a split set, read with the `gguf` package, memory-mapped.

Opening reads the headers of every part: metadata, and each tensor's name, type, shape and place,
checked against the file before anything is mapped: a truncated part, a tensor running past its part
or into the next one (a header lying about a size), an unknown or unsupported type, a missing or
misnumbered split part are each one `GGUFError` naming the file and the tensor. Tensor data stay in
the memory map; `dequantize` turns one into a torch tensor, through `gguf.quants` for block types.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from hetero_moe.loader.checkpoint import CheckpointError, TensorInfo

# what we read: plain floats, and the block types whose dequantization `gguf.quants` has
SUPPORTED = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K)
SUPPORTED += (QT.IQ4_NL, QT.IQ4_XS)
SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MIN_BYTES = 24  # magic, version, tensor count, metadata count


class GGUFError(CheckpointError):
    """A GGUF file that cannot be used; the message names the file (and the tensor, where one is at fault)."""


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix == ".gguf"


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: QT
    shape: tuple[int, ...]  # torch order, outermost first (GGUF lists the dimensions innermost first)
    data: np.ndarray  # the memory map: values for F32/F16, raw bytes [..., row bytes] for the rest
    file: Path
    offset: int  # of its first byte in `file`
    nbytes: int

    def info(self) -> TensorInfo:
        """As a checkpoint tensor (raw bytes), for keys of caches built from it."""
        return TensorInfo(self.name, self.file, torch.uint8, torch.Size(self.data.shape), self.nbytes, self.offset)


def dequantize(t: GGUFTensor, index: int | None = None) -> torch.Tensor:
    """The tensor's values (or those of `t[index]`, e.g. one expert of a stack): F32, F16 and BF16 as they
    are (copied out of the map), block types as float32 through `gguf.quants.dequantize`."""
    data, shape = (t.data, t.shape) if index is None else (t.data[index], t.shape[1:])
    if t.type == QT.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
    if t.type == QT.F16:
        return torch.from_numpy(np.array(data, dtype=np.float16)).reshape(shape)
    if t.type == QT.BF16:
        bits = np.array(data).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(gguf.quants.dequantize(data, t.type)).reshape(shape)


class _Reader(gguf.GGUFReader):
    """`gguf.GGUFReader`, checking each tensor's type and extent before it maps the tensor (the reader
    would fail on a truncated file with a bare reshape error, and on an unknown type with no tensor name)."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            code = int(raw_dtype[0])
            try:
                qtype = QT(code)
            except ValueError:
                raise GGUFError(f"tensor {name} has unknown type {code}") from None
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            elements = 1
            for d in dims.tolist():
                elements *= int(d)
            if dims.size and int(dims[0]) % block:
                raise GGUFError(f"tensor {name}: rows of {int(dims[0])} values are not whole {qtype.name} blocks")
            end = start_offs + int(offset[0]) + elements // block * size
            if end > self.data.nbytes:
                raise GGUFError(
                    f"truncated: tensor {name} ends at byte {end}, the file has {self.data.nbytes} "
                    f"(shape {list(reversed(dims.tolist()))}, {qtype.name})"
                )
        super()._build_tensors(start_offs, fields)


@dataclass(frozen=True)
class GGUFFile:
    path: Path  # the file given: a single file or the first part of a split set
    parts: tuple[Path, ...]
    metadata: dict[str, Any]  # of the first part (the others repeat it or hold none)
    tensors: dict[str, GGUFTensor]  # in file order

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        path = Path(path)
        parts = split_parts(path)
        metadata: dict[str, Any] = {}
        tensors: dict[str, GGUFTensor] = {}
        for no, part in enumerate(parts):
            reader = _open_reader(part)
            meta = {name: field.contents() for name, field in reader.fields.items()}
            _check_split(part, meta, no, len(parts))
            if no == 0:
                metadata = meta
            for t in _tensors(part, reader):
                if t.name in tensors:
                    raise GGUFError(f"{part}: tensor {t.name} is also in {tensors[t.name].file.name}")
                tensors[t.name] = t
        expected = metadata.get("split.tensors.count")
        if expected is not None and expected != len(tensors):
            raise GGUFError(f"{path}: the split set holds {len(tensors)} tensors, its first part says {expected}")
        return cls(path, parts, metadata, tensors)

    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: no general.architecture in the metadata")
        return arch

    def unsupported(self) -> list[GGUFTensor]:
        return [t for t in self.tensors.values() if t.type not in SUPPORTED]

    def check_types(self) -> None:
        """Every tensor of a type we read, else one error naming the first few and what is supported."""
        bad = self.unsupported()
        if bad:
            listed = ", ".join(f"{t.name} ({t.type.name})" for t in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise GGUFError(
                f"{self.path}: tensor type not supported: {listed}{more}; supported: "
                f"{', '.join(q.name for q in SUPPORTED)}"
            )


def split_parts(path: Path) -> tuple[Path, ...]:
    """The files of the model: `path` alone, or every part of the split set whose first part it is."""
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    m = SPLIT.match(path.name)
    if m is None:
        return (path,)
    count = int(m["count"])
    if int(m["no"]) != 1:
        first = path.with_name(f"{m['stem']}-00001-of-{m['count']}.gguf")
        raise GGUFError(f"{path}: part {int(m['no'])} of a split set; give its first part, {first.name}")
    parts = tuple(path.with_name(f"{m['stem']}-{k:05d}-of-{m['count']}.gguf") for k in range(1, count + 1))
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise GGUFError(f"{path}: split set of {count} parts, missing: {', '.join(missing)}")
    return parts


def _open_reader(part: Path) -> _Reader:
    size = part.stat().st_size
    if size < MIN_BYTES:
        raise GGUFError(f"{part}: truncated ({size} bytes, not even a GGUF header)")
    try:
        return _Reader(part, "r")
    except GGUFError as e:
        raise GGUFError(f"{part}: {e}") from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise GGUFError(f"{part}: not a readable GGUF file (truncated or corrupt): {' '.join(str(e).split())}") from e


def _check_split(part: Path, meta: dict[str, Any], no: int, count: int) -> None:
    said_no, said_count = meta.get("split.no"), meta.get("split.count")
    if count == 1 and said_count not in (None, 0, 1):
        raise GGUFError(f"{part}: part of a split set of {said_count} files, not named as one (NAME-00001-of-N.gguf)")
    if count > 1 and (said_no != no or said_count != count):
        raise GGUFError(f"{part}: its metadata says part {said_no} of {said_count}, its name part {no} of {count}")


def _tensors(part: Path, reader: _Reader) -> list[GGUFTensor]:
    """The part's tensors, checked not to overlap (a header that lies about a size runs into the next one)."""
    out = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out.append(GGUFTensor(t.name, QT(t.tensor_type), shape, t.data, part, int(t.data_offset), int(t.n_bytes)))
    spans = sorted(out, key=lambda t: t.offset)
    for a, b in itertools.pairwise(spans):
        if a.offset + a.nbytes > b.offset:
            raise GGUFError(
                f"{part}: tensor {a.name} ({list(a.shape)}, {a.type.name}, {a.nbytes} bytes) runs into "
                f"tensor {b.name}: the header does not match the data"
            )
    return out
