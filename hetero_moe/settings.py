"""Environment variables, read in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where hetero-moe keeps what it builds (the demo model): `$HETERO_MOE_CACHE`, else
    `$XDG_CACHE_HOME/hetero-moe`, else `~/.cache/hetero-moe`."""
    if env := os.environ.get("HETERO_MOE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hetero-moe"
