"""`python -m hetero_moe.cli`: the same as the `hetero-moe` command. Run from a checkout's root, `-m` puts that
folder first on sys.path, where our kernels/ folder (installed as hetero_moe.kernels) would stand in for Hugging
Face's `kernels` package, which transformers imports: the root leaves sys.path before anything imports it."""

import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]

from hetero_moe.cli import main  # noqa: E402

sys.exit(main())
