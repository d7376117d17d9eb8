"""The built-in demo model: a tiny DeepSeek-V3-architecture checkpoint with random weights, built
deterministically on first use into the cache directory, in the real release's on-disk layout
(FP8 block-quantized linears, per-expert keys, two shards, a tokenizer with a chat template).

Its weights are random, so its text is gibberish: it exists so the quick start and the tests run
with no download.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from hetero_moe.settings import cache_dir

log = logging.getLogger(__name__)

DEMO_VERSION = 3  # bump when the demo's config or layout changes
DEMO_SHAPE = {"num_hidden_layers": 4, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2}
DONE_MARKER = ".complete"


def demo_model_dir() -> Path:
    """The demo model's directory, built there first if it is not complete yet."""
    target = cache_dir() / f"demo-v{DEMO_VERSION}"
    if (target / DONE_MARKER).is_file():
        return target
    from hetero_moe.synth import tiny as synth

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the demo model in %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        config = synth.tiny_config("DeepseekV3ForCausalLM", **DEMO_SHAPE)
        synth.write_checkpoint(synth.random_model(config, seed=0), tmp, shards=2, fp8=True)
        (tmp / DONE_MARKER).write_text("ok\n")
        if target.exists():  # an incomplete build left behind
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / DONE_MARKER).is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
