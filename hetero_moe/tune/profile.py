"""`hetero-moe profile`: how often each routed expert of each MoE layer is chosen on a set of prompts,
the input `hetero-moe plan` uses to pin the busiest experts on the GPU.

All prompts run together through the engine (prefill and greedy decode); a hook on each MoE block's
router counts the experts it picks for every token. The result is JSON:
`{"model", "architecture", "num_experts", "tokens", "layers": {"model.layers.N.mlp": [count per expert]}}`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.llm import LLM
from hetero_moe.ops.moe import MoEBlock

FORMAT = 1


def read_prompts(path: Path) -> list[str | list[dict]]:
    """One prompt per line: plain text, or JSON with `prompt` (text) or `messages` (a chat)."""
    prompts: list[str | list[dict]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
            if isinstance(item.get("prompt"), str):
                prompts.append(item["prompt"])
            elif isinstance(item.get("messages"), list):
                prompts.append(item["messages"])
            else:
                raise ValueError(f'{path}:{n}: a JSON line needs "prompt" (text) or "messages" (a chat)')
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def profile(llm: LLM, prompts: list[str | list[dict]], max_tokens: int = 32) -> dict:
    blocks = {name: m for name, m in llm.placed.model.named_modules() if isinstance(m, MoEBlock)}
    counts = {name: np.zeros(b.gate.num_experts, np.int64) for name, b in blocks.items()}
    tokens = 0

    def hook(name: str):
        def count(module, args, out) -> None:
            index = out[1].reshape(-1).cpu().numpy()
            counts[name] += np.bincount(index, minlength=len(counts[name]))

        return count

    handles = [b.gate.register_forward_hook(hook(name)) for name, b in blocks.items()]
    try:
        ids = [llm.chat_ids(p) if isinstance(p, list) else llm.encode(p) for p in prompts]
        for done in llm.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0)):
            tokens += len(done.prompt_token_ids) + len(done.token_ids) - 1  # the last token is never run
    finally:
        for h in handles:
            h.remove()
    first = next(iter(blocks.values()))
    return {
        "format": FORMAT,
        "model": str(llm.model_dir),
        "architecture": llm.placed.arch.name,
        "num_experts": first.gate.num_experts,
        "top_k": first.gate.top_k,
        "tokens": tokens,
        "layers": {name: c.tolist() for name, c in counts.items()},
    }


def load_profile(path: Path) -> dict:
    """A profile written by `profile`, checked for the fields `plan` reads."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a profile: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), dict):
        raise ValueError(f"{path}: not a profile written by `hetero-moe profile` (format {FORMAT})")
    experts = data.get("num_experts")
    for name, counts in data["layers"].items():
        if not isinstance(counts, list) or len(counts) != experts or any(not isinstance(c, int) for c in counts):
            raise ValueError(f"{path}: layer {name} does not hold {experts} integer counts")
    return data
