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


def triton_on_cpu() -> bool:
    """True when ops on the CPU take the GPU's Triton kernels, run by Triton's interpreter: tests of the GPU
    path on a machine without one set `HETERO_MOE_TRITON_ON_CPU=1` (and `TRITON_INTERPRET=1` before triton
    is imported). Otherwise CPU ops run their own CPU code, as users' CPUs do."""
    return os.environ.get("HETERO_MOE_TRITON_ON_CPU", "0") not in ("", "0")


def cpu_isa() -> str | None:
    """The instruction set forced on the CPU kernels (`HETERO_MOE_CPU_ISA`: avx512amx, avx512vnni, avxvnni,
    avx2, float), or None for the best this CPU has."""
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
    """Bytes of DRAM available to new allocations: MemAvailable, or less where this process's cgroup (a
    container's memory limit, cgroup v2 or v1) leaves less; None where /proc/meminfo is absent."""
    available = _meminfo("MemAvailable")
    group = _cgroup_memory()
    if available is None or group is None:
        return available
    limit, usage = group
    return min(available, max(limit - usage, 0))


def total_memory() -> int | None:
    """Bytes of DRAM in all: MemTotal, or this process's cgroup limit where lower; None where /proc/meminfo
    is absent."""
    total = _meminfo("MemTotal")
    group = _cgroup_memory()
    return total if total is None or group is None else min(total, group[0])


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_FILES = {  # hierarchy -> (its folder, limit file, usage file)
    "v2": ("/sys/fs/cgroup", "memory.max", "memory.current"),
    "v1": ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
}
# the page cache the kernel reclaims first, in memory.stat: usage counts it, but it is not in use
INACTIVE_FILE = {"v2": "inactive_file", "v1": "total_inactive_file"}


def _cgroup_memory() -> tuple[int, int] | None:
    """(limit, usage) in bytes of this process's memory cgroup, or None where it has no limit (or none
    can be read). Usage leaves out the inactive page cache (a file read once, say), as `docker stats`
    does. A v1 "no limit" is a number near 2^63: anything above 2^60 counts as none."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
        if version is None:
            continue
        root, limit_file, usage_file = CGROUP_FILES[version]
        folder = Path(root) / path.lstrip("/")
        try:
            limit, usage = ((folder / f).read_text().strip() for f in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return int(limit), max(int(usage) - _stat(folder / "memory.stat", INACTIVE_FILE[version]), 0)
    return None


def _stat(path: Path, key: str) -> int:
    """The value of `key` in a memory.stat file, 0 where absent."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        return 0
    return 0
