"""`python -m hetero_moe.cli`: the same as the `hetero-moe` command."""

import sys

from hetero_moe.cli import main

sys.exit(main())
