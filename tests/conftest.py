"""Shared fixtures: tiny checkpoints of every architecture, built once per session."""

from __future__ import annotations

import copy
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
        return _greedy(model, prompt, n)[0, len(prompt) :].tolist()

    return run


def _greedy(model: PreTrainedModel, prompt: list[int], n: int, **kwargs):
    """`model.generate`, greedy for `n` tokens past any EOS, on the model's device."""
    ids = torch.tensor([prompt], device=model.device)
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=model.config.pad_token_id,
        **kwargs,
    )


@pytest.fixture(scope="session")
def bf16_accuracy() -> Callable[..., None]:
    """Checks our bf16 logits against the float32 model beside transformers' own bf16, teacher-forced
    over `positions` tokens of transformers' bf16 greedy sequence. bf16 rounds any two orders of the same
    sums apart, and with random tiny weights a rounding can flip a router's choice of expert: then the
    logits move far, and top tokens of two bf16 implementations differ at many positions although
    neither is wrong. So the measure is the distance to float32: ours (relative norm over all logits)
    within 1.5x transformers' own bf16 distance (its one forward over the sequence and its cached decode,
    the farther of the two), and our top-1 agreeing with float32's as often as theirs, less 0.05.
    `models` is one or more (checkpoint, our LLM on it) pairs, pooled: one random model is one draw
    (on the H200, Mixtral's seed 0 put our top-1 at 0.805 against transformers' 0.871, seeds 1 and 2 at
    0.918 against 0.863 and 0.930 against 0.918)."""

    def logits(t: Tiny, llm, prompt: list[int], device: str, positions: int) -> list[torch.Tensor]:
        from hetero_moe.bench.teacher import TeacherForced

        exact = copy.deepcopy(t.reference).to(device)
        ref = copy.deepcopy(t.reference).to(device, torch.bfloat16)
        # transformers' default grouped_mm fails in bf16 on the CPU when a row is not a multiple of 16 bytes
        ref.set_experts_implementation("eager")
        n = len(prompt)
        with torch.inference_mode():
            gen = _greedy(ref, prompt, positions, return_dict_in_generate=True, output_logits=True)
            seq = gen.sequences
            cached = torch.cat(gen.logits).float()
            full = ref(seq).logits[0, n - 1 : -1].float()
            f32 = exact(seq).logits[0, n - 1 : -1].float()
        feed = TeacherForced(llm.runner, seq.shape[1])
        ours = [feed.feed(prompt)] + [feed.feed([tok]) for tok in seq[0, n:-1].tolist()]
        ours = torch.stack(ours).float().reshape(positions, -1).to(device)
        return [ours, full, cached, f32]

    def check(models: list[tuple[Tiny, object]], prompt: list[int], device: str, positions: int = 256) -> None:
        each = [logits(t, llm, prompt, device, positions) for t, llm in models]
        ours, full, cached, f32 = (torch.cat(x) for x in zip(*each, strict=True))

        def err(x: torch.Tensor) -> float:
            return float((x - f32).norm() / f32.norm())

        def agree(x: torch.Tensor) -> float:
            return float((x.argmax(-1) == f32.argmax(-1)).float().mean())

        detail = (
            f"over {len(models)} model(s), distance to float32: ours {err(ours):.4f}, transformers' one forward "
            f"{err(full):.4f}, its cached decode {err(cached):.4f}; top-1 as float32's: ours {agree(ours):.3f}, "
            f"transformers {agree(full):.3f} / {agree(cached):.3f}"
        )
        assert err(ours) <= 1.5 * max(err(full), err(cached)), detail
        assert agree(ours) >= min(agree(full), agree(cached)) - 0.05, detail

    return check


@pytest.fixture
def triton_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models built in the test take the GPU's Triton kernels (latent decode, `op linear`): on a machine
    without a GPU, run by Triton's interpreter. Other tests run the CPU's own paths, as users' CPUs do."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("HETERO_MOE_TRITON_ON_CPU", "1")
