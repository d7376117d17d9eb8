"""`python -m hetero_moe.cli`: the same as the `hetero-moe` command. Run from a checkout's root, `-m` puts that
folder first on sys.path, where our kernels/ folder (installed as hetero_moe.kernels) would stand in for Hugging
Face's `kernels` package, which transformers imports: the folder that holds ours leaves sys.path before anything
imports it (an installed wheel keeps it inside hetero_moe/, on no path)."""

import importlib.util
import sys
from pathlib import Path

ours = Path(importlib.util.find_spec("hetero_moe.kernels").origin).parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ours]

from hetero_moe.cli import main  # noqa: E402

sys.exit(main())
