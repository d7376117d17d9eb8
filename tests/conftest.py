"""Shared fixtures: tiny checkpoints of every architecture, built once per session."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The repository's root is no place to import from (`python -m pytest` puts it first on sys.path): its
# kernels/ folder, installed as hetero_moe.kernels, would stand in for Hugging Face's `kernels` package,
# which transformers 5.25 and later import.
if (root := Path(__file__).resolve().parents[1]) in (Path(p or ".").resolve() for p in sys.path):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; it must be chosen before anything
    # (transformers included) imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import PreTrainedModel

from hetero_moe.synth import tiny as synth

ARCHS = synth.SUPPORTED


@dataclass(frozen=True)
class Tiny:
    path: Path
    reference: PreTrainedModel  # transformers' own model holding exactly the checkpoint's values


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Tiny]:
    """`tiny(arch, fp8=False, shards=1, dtype=torch.bfloat16, seed=0, **config_overrides)`."""
    built: dict[tuple, Tiny] = {}

    def make(
        arch: str,
        *,
        fp8: bool = False,
        shards: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
        block_size: tuple[int, int] = (128, 128),
        **overrides,
    ) -> Tiny:
        key = (arch, fp8, shards, dtype, seed, block_size, repr(sorted(overrides.items())))
        if key not in built:
            model = synth.random_model(synth.tiny_config(arch, **overrides), seed=seed)
            out = tmp_path_factory.mktemp(arch)
            written = synth.write_checkpoint(model, out, shards=shards, fp8=fp8, dtype=dtype, block_size=block_size)
            model.load_state_dict(written.state_dict)
            built[key] = Tiny(written.path, model)
        return built[key]

    return make


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo model and other cached builds go to one temporary directory for the whole session."""
    monkeypatch.setenv("HETERO_MOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def hf_greedy() -> Callable[[PreTrainedModel, list[int], int], list[int]]:
    """transformers' own greedy continuation (no EOS stop): the oracle for token-for-token checks."""

    def run(model: PreTrainedModel, prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.config.pad_token_id,
        )
        return out[0, len(prompt) :].tolist()

    return run


@pytest.fixture
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models built in the test take the GPU's Triton kernels (latent decode, `op linear`): on a machine
    without a GPU, run by Triton's interpreter. Other tests run the CPU's own paths, as users' CPUs do."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("HETERO_MOE_TRITON_ON_CPU", "1")
