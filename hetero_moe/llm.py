"""The Python API: `LLM(model_dir, rules=...)` loads a model placed by rules; `.generate(...)`."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hetero_moe.arch import build_meta_model, config_dtype, load_config
from hetero_moe.engine.engine import Completion, Engine, StepOutput
from hetero_moe.engine.runner import ModelRunner
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.inject.injector import InjectError, PlacedModel, inject
from hetero_moe.inject.rules import load_rules
from hetero_moe.loader.checkpoint import Checkpoint
from hetero_moe.loader.load import Progress, load_weights
from hetero_moe.settings import physical_cores

log = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]
DEFAULT_RULES = "cpu-only.yaml"


def resolve_dtype(name: str, config) -> torch.dtype:
    if name == "auto":
        return config_dtype(config)
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def place(model_dir: str | Path, rules: str | Path, dtype: str = "auto", cpu_threads: int | None = None) -> PlacedModel:
    """Build the model on the meta device and apply the rules; no weight is read."""
    config, arch = load_config(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    rule_set = load_rules(rules)
    threads = cpu_threads or physical_cores()
    return inject(build_meta_model(config, arch, torch_dtype), rule_set, config, arch, torch_dtype, threads)


def eos_token_ids(model_dir: Path, config, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        rules: str | Path = DEFAULT_RULES,
        dtype: DType = "auto",
        max_context: int | None = None,
        progress: Progress | None = None,
        cpu_threads: int | None = None,
    ) -> None:
        if model is None:
            from hetero_moe.demo import demo_model_dir

            model = demo_model_dir()
        self.model_dir = Path(model)
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {cpu_threads}")
        self.placed = place(self.model_dir, rules, dtype, cpu_threads)
        for warning in self.placed.warnings:
            log.warning("%s", warning)
        for device in self.placed.devices():
            if device.type == "cuda" and not torch.cuda.is_available():
                raise InjectError(
                    f"the rules place modules on {device}, but torch sees no CUDA device; "
                    "use rules for the CPU (cpu-only.yaml)"
                )
        config = self.placed.config
        limit = config.max_position_embeddings
        if max_context is not None and not 0 < max_context <= limit:
            raise ValueError(f"max_context must be in 1..{limit} for this model, got {max_context}")
        checkpoint = Checkpoint.open(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        load_weights(self.placed, checkpoint, progress)
        self.runner = ModelRunner(self.placed)
        self.engine = Engine(
            self.runner, self.tokenizer, eos_token_ids(self.model_dir, config, self.tokenizer), max_context or limit
        )

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return list(prompt)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{self.model_dir}: the tokenizer has no chat template")
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(enc["input_ids"])

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **sampling) -> Completion:
        """Complete a raw prompt (text, tokenized as the model's tokenizer does, or token ids).
        Sampling is given as `params` or as its fields (`max_tokens=..., temperature=..., stop=...`)."""
        return self.engine.generate(self.encode(prompt), params or sampling_params(**sampling))

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, **sampling
    ) -> Iterator[StepOutput]:
        return self.engine.stream(self.encode(prompt), params or sampling_params(**sampling))

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **sampling) -> Completion:
        return self.engine.generate(self.chat_ids(messages), params or sampling_params(**sampling))


def sampling_params(stop: str | Sequence[str] | None = None, **fields) -> SamplingParams:
    """SamplingParams from keyword fields, `stop` given as one string, a list or None."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingParams(stop=stops, **fields)
