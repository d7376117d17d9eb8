"""A disk cache of weights converted at load (INT4 experts): written once, memory-mapped after, and read
into memory at load when it fits there (else decoding reads it from disk through the page cache).

Each cached op is one safetensors file whose metadata holds the key it was built from (the source
files' names, sizes and modification times, the tensor names, the quant settings). A file whose key
differs is stale; one that cannot be read whole is corrupt; either is rebuilt. Files are written
under a temporary name and renamed, so a crash never leaves a half-written cache behind the real name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from hetero_moe.loader.checkpoint import CheckpointError, TensorInfo, memory_map, prefault, read_header
from hetero_moe.settings import RESERVES, available_memory, total_memory

log = logging.getLogger(__name__)

VERSION = 1  # bump when a cached layout changes


def cache_key(sources: Iterable[TensorInfo], settings: Mapping[str, object]) -> str:
    """A digest of what the conversion depends on: the source tensors' files and names, and settings."""
    files = {}
    keys = []
    for info in sources:
        keys.append(info.key)
        if info.file not in files:
            stat = info.file.stat()
            files[info.file] = [info.file.name, stat.st_size, stat.st_mtime_ns]
    blob = json.dumps(
        {"version": VERSION, "files": sorted(files.values()), "keys": sorted(keys), "settings": dict(settings)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def load(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, memory-mapped, or None when the file is missing, stale or corrupt."""
    if not path.is_file():
        return None
    try:
        infos = read_header(path)
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header_len)).get("__metadata__", {})
    except (CheckpointError, OSError, ValueError) as e:
        log.warning("converted-weights cache %s is corrupt (%s); rebuilding it", path, e)
        return None
    if meta.get("key") != key:
        log.info("converted-weights cache %s is stale; rebuilding it", path)
        return None
    arrays = {info.key: memory_map(info) for info in infos}
    if fits_in_memory(path.stat().st_size):
        prefault(path, arrays.values())
    else:
        log.info("%s does not fit in the memory left: its weights are read from disk as decoding needs them", path)
    return arrays


def fits_in_memory(nbytes: int) -> bool:
    """Whether `nbytes` more fit in DRAM beside the host's reserve (True where the OS does not say)."""
    available, total = available_memory(), total_memory()
    return available is None or total is None or nbytes <= RESERVES["cpu"].usable(available, total)


def save(path: Path, key: str, arrays: Mapping[str, np.ndarray]) -> bool:
    """Write the cache file; False, with a warning, where it cannot be written (a full disk, a read-only
    cache folder): the op then runs from the arrays in memory, and the next load converts them again."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        log.warning("could not write the converted-weights cache %s (%s): running from memory", path, e)
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


@dataclass(frozen=True)
class Entry:
    """One op's converted weights: the cache file and the key they must have been built from."""

    path: Path
    key: str

    def load(self) -> dict[str, np.ndarray] | None:
        return load(self.path, self.key)

    def save(self, arrays: Mapping[str, np.ndarray]) -> bool:
        return save(self.path, self.key, arrays)


@dataclass(frozen=True)
class ConvertedCache:
    """The converted-weights cache under `root`: one folder per model directory, one file per op."""

    root: Path

    def entry(self, name: str, sources: list[TensorInfo], settings: Mapping[str, object]) -> Entry:
        """The cache entry of op `name` converted from `sources` (its checkpoint tensors) with `settings`:
        one folder per model directory, or per GGUF file (several often share a directory)."""
        model = sources[0].file if sources[0].file.suffix == ".gguf" else sources[0].file.parent
        folder = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:16]
        quant = settings.get("quant", "converted")
        return Entry(self.root / folder / f"{name}.{quant}.safetensors", cache_key(sources, settings))
