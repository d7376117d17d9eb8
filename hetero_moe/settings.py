"""Environment variables, read in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def cache_dir() -> Path:
    """Where hetero-moe keeps what it builds (the demo model): `$HETERO_MOE_CACHE`, else
    `$XDG_CACHE_HOME/hetero-moe`, else `~/.cache/hetero-moe`."""
    if env := os.environ.get("HETERO_MOE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hetero-moe"


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyperthread siblings counted once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(path.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def triton_interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (`TRITON_INTERPRET=1`, tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cpu_isa() -> str | None:
    """The instruction set forced on the CPU kernels (`HETERO_MOE_CPU_ISA`: avx512vnni, avxvnni, avx2,
    float), or None for the best this CPU has."""
    return os.environ.get("HETERO_MOE_CPU_ISA") or None


GB = 1e9


@dataclass(frozen=True)
class Reserve:
    """Memory a device keeps free beyond the weights and the KV cache: a fixed amount for the runtime
    (the CUDA context or the OS and Python, activations) plus a share of the device (allocator slack)."""

    fixed: float
    share: float = 0.05

    def usable(self, free: float, total: float) -> float:
        """Bytes of `free` that weights and KV cache may take, on a device of `total` bytes."""
        return max(free - self.fixed - self.share * total, 0.0)


RESERVES = {"cuda": Reserve(1 * GB), "cpu": Reserve(4 * GB)}


def available_memory() -> int | None:
    """Bytes of DRAM available to new allocations (MemAvailable), or None where /proc/meminfo is absent."""
    return _meminfo("MemAvailable")


def total_memory() -> int | None:
    """Bytes of DRAM in all (MemTotal), or None where /proc/meminfo is absent."""
    return _meminfo("MemTotal")


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
