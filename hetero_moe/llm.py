"""The Python API: `LLM(model, rules=...)` loads a model (a directory, or a GGUF file) placed by rules;
`.generate(...)`, `.chat(...)`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from hetero_moe.arch import build_meta_model, config_dtype, load_config, read_json_object
from hetero_moe.engine.engine import Engine
from hetero_moe.engine.grammar import Grammar
from hetero_moe.engine.request import Completion, StepOutput
from hetero_moe.engine.runner import ModelRunner
from hetero_moe.engine.sampler import SamplingParams
from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.inject.injector import InjectError, PlacedModel, inject
from hetero_moe.inject.rules import load_rules
from hetero_moe.loader.checkpoint import Checkpoint
from hetero_moe.loader.converted import ConvertedCache
from hetero_moe.loader.gguf_file import GGUFFile, is_gguf
from hetero_moe.loader.gguf_load import load_gguf_weights, use_gguf_blocks
from hetero_moe.loader.gguf_model import gguf_config, load_gguf_tokenizer
from hetero_moe.loader.load import Progress, load_weights
from hetero_moe.ops.base import Services
from hetero_moe.ops.experts import TorchExperts
from hetero_moe.prompt import PromptEncoder, load_tokenizer
from hetero_moe.settings import cache_dir, cpu_isa, physical_cores, triton_on_cpu
from hetero_moe.tools import Tool, ToolCall, ToolRequest
from hetero_moe.tools import parse as parse_tools

log = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]
DEFAULT_RULES = "cpu-only.yaml"


def resolve_dtype(name: str, config) -> torch.dtype:
    if name == "auto":
        return config_dtype(config)
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def place(
    model_dir: str | Path,
    rules: str | Path,
    dtype: str = "auto",
    cpu_threads: int | None = None,
    services: Services | None = None,
) -> PlacedModel:
    """Build the model on the meta device and apply the rules; no weight is read. `auto` is the checkpoint's
    dtype, except float32 where the rules put everything on the CPU and quantize every linear and the routed
    experts: the CPU kernels take float32 activations, torch's CPU paths for bf16 are slow, and only small
    tensors (norms, routers) and the embedding, of which a token reads one row, stay unquantized."""
    gguf = GGUFFile.open(model_dir) if is_gguf(model_dir) else None
    config, arch = gguf_config(gguf) if gguf is not None else load_config(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    rule_set = load_rules(rules)
    threads = cpu_threads or physical_cores()
    services = services or Services(triton_on_cpu=triton_on_cpu(), cpu_isa=cpu_isa())
    placed = inject(build_meta_model(config, arch, torch_dtype), rule_set, config, arch, torch_dtype, threads, services)
    if gguf is not None:  # experts in the file's blocks run in them: their bytes count as such from here on
        use_gguf_blocks(placed, gguf)
    if dtype == "auto" and torch_dtype != torch.float32 and _quantized_on_cpu(placed):
        return place(model_dir, rules, "float32", cpu_threads, services)
    return placed


def serving_services() -> Services:
    """What a model placed to run (not only checked) uses: the converted-weights cache under `cache_dir()`, the
    CPU's kernels."""
    return Services(ConvertedCache(cache_dir() / "converted"), triton_on_cpu(), cpu_isa())


def _quantized_on_cpu(placed: PlacedModel) -> bool:
    """Everything on the CPU, every linear and the routed experts quantized (no plain `nn.Linear` and not
    the exact experts op left)."""
    cpu_only = all(d.type == "cpu" for d in placed.devices())
    return cpu_only and not any(isinstance(m, nn.Linear | TorchExperts) for m in placed.model.modules())


def eos_token_ids(model_dir: Path, config, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        sources.append(read_json_object(gen).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


class LLM:
    """A model placed by rules and loaded, with its engine: `generate`, `chat` and `stream` run all their
    prompts through the engine at once (continuous batching) and return results in input order."""

    def __init__(
        self,
        model: str | Path | None = None,
        rules: str | Path = DEFAULT_RULES,
        dtype: DType = "auto",
        max_context: int | None = None,
        progress: Progress | None = None,
        cpu_threads: int | None = None,
        batching: SchedulerConfig | None = None,
    ) -> None:
        if model is None:
            from hetero_moe.synth.demo import demo_model_dir

            model = demo_model_dir()
        self.model_dir = Path(model)
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {cpu_threads}")
        self.placed = place(self.model_dir, rules, dtype, cpu_threads, serving_services())
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
        self.max_context = max_context or limit
        if is_gguf(self.model_dir):
            gguf = GGUFFile.open(self.model_dir)
            self.tokenizer = load_gguf_tokenizer(self.model_dir, gguf.metadata)
            self.prompts = PromptEncoder(self.tokenizer, self.model_dir)
            load_gguf_weights(self.placed, gguf, progress)
        else:
            checkpoint = Checkpoint.open(self.model_dir)
            self.tokenizer = load_tokenizer(self.model_dir)  # never the folder's own code
            self.prompts = PromptEncoder(self.tokenizer, self.model_dir)
            load_weights(self.placed, checkpoint, progress)
        self.runner = ModelRunner(self.placed)
        self.eos_ids = eos_token_ids(self.model_dir, config, self.tokenizer)
        self.engine = self.new_engine(batching or SchedulerConfig())

    def new_engine(self, batching: SchedulerConfig) -> Engine:
        """Another engine over this loaded model, with its own KV cache pool and batching settings; only
        one of them may step at a time."""
        return Engine(self.runner, self.tokenizer, self.eos_ids, self.max_context, batching)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A raw prompt's token ids (special tokens in the text count as such)."""
        return self.prompts.encode(prompt)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A chat's token ids through the chat template (with OpenAI-style `tools`, if given); special tokens
        typed in messages stay plain text."""
        return self.prompts.chat_ids(messages, tools)

    def generate(self, prompts: Prompt | Sequence[Prompt], params: Params = None, **sampling) -> Result:
        """Complete raw prompts (text, tokenized as the model's tokenizer does, or token ids): one prompt
        gives one `Completion`, a list of prompts a list in the same order. Sampling is given as `params`
        (one, or one per prompt) or as its fields (`max_tokens=..., temperature=..., stop=...`)."""
        single = _single(prompts)
        ids = [self.encode(p) for p in ([prompts] if single else prompts)]
        return self._run(ids, params, sampling, single)

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        params: Params = None,
        *,
        tools: Sequence[Tool | dict] | None = None,
        tool_choice: str = "auto",
        parallel_tool_calls: bool = True,
        **sampling,
    ) -> Result:
        """Answer chats (lists of messages) through the model's chat template; one or a list, as `generate`.
        With `tools` (`Tool`s or OpenAI's function tools), the template shows them to the model and each
        answer is a `ChatCompletion`: its text outside calls, and its `tool_calls`; `tool_choice` "auto",
        "none", "required" or a function's name (the last two enforced by a grammar)."""
        single = not conversations or isinstance(conversations[0], dict)
        chats = [conversations] if single else conversations
        if not tools:
            return self._run([self.chat_ids(c) for c in chats], params, sampling, single)
        request = ToolRequest(tuple(as_tool(t) for t in tools), tool_choice, parallel_tool_calls)
        fmt, grammar = self.prompts.tool_setup(request)
        ids = [self.chat_ids(c, request.rendered) for c in chats]
        plain = self._params(params, sampling, len(ids))
        if fmt is not None:
            plain = [
                replace(p, skip_special_tokens=not fmt.special_markers, grammar=grammar or p.grammar) for p in plain
            ]
        done = self._run(ids, plain, {}, False)
        if fmt is None:
            return done[0] if single else done
        answers = []
        for c in done:
            parsed = parse_tools(fmt, c.text, request.parallel)
            reason = "tool_calls" if parsed.tool_calls and c.finish_reason == "stop" else c.finish_reason
            fields = {**vars(c), "text": parsed.text, "finish_reason": reason}
            answers.append(ChatCompletion(**fields, tool_calls=tuple(parsed.tool_calls)))
        return answers[0] if single else answers

    def stream(self, prompts: Prompt | Sequence[Prompt], params: Params = None, **sampling) -> Iterator:
        """`generate`'s steps as they come: `StepOutput`s for one prompt, (prompt index, `StepOutput`) for a
        list of prompts."""
        single = _single(prompts)
        ids = [self.encode(p) for p in ([prompts] if single else prompts)]
        steps = self.engine.stream(ids, self._params(params, sampling, len(ids)))
        return (step for _, step in steps) if single else steps

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, ids: list[list[int]], params: Params, sampling: dict, single: bool) -> Result:
        steps: list[list[StepOutput]] = [[] for _ in ids]
        for i, step in self.engine.stream(ids, self._params(params, sampling, len(ids))):
            steps[i].append(step)
        done = [Completion.of(p, s) for p, s in zip(ids, steps, strict=True)]
        return done[0] if single else done

    @staticmethod
    def _params(params: Params, sampling: dict, n: int) -> list[SamplingParams]:
        if params is not None and sampling:
            raise ValueError("give sampling as `params` or as its fields, not both")
        if params is None:
            params = sampling_params(**sampling)
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"{len(params)} sampling params for {n} prompts")
        return list(params)


@dataclass(frozen=True)
class ChatCompletion(Completion):
    """A chat answer given tools: `text` is what the model wrote outside its calls."""

    tool_calls: tuple[ToolCall, ...] = ()


def as_tool(tool: Tool | dict) -> Tool:
    """A `Tool`, or one from OpenAI's `{"type": "function", "function": {...}}`."""
    if isinstance(tool, Tool):
        return tool
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or "name" not in fn:
        raise ValueError(f"a tool is a Tool or {{'type': 'function', 'function': {{'name': ...}}}}, got {tool!r}")
    parameters = fn.get("parameters") or {"type": "object", "properties": {}}
    return Tool(fn["name"], fn.get("description") or "", parameters)


Prompt = str | Sequence[int]
Conversation = list[dict[str, str]]
Params = SamplingParams | Sequence[SamplingParams] | None
Result = Completion | list[Completion]


def _single(prompts) -> bool:
    """One prompt (text or token ids; an empty list is an empty prompt) rather than a list of them."""
    return isinstance(prompts, str) or not prompts or isinstance(prompts[0], int)


def sampling_params(
    stop: str | Sequence[str] | None = None, json_schema: dict | bool | str | None = None, **fields
) -> SamplingParams:
    """SamplingParams from keyword fields, `stop` given as one string, a list or None; `json_schema` (a
    schema as a dict or JSON text) is short for `grammar=Grammar.json_schema(...)`."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if json_schema is not None:
        if fields.get("grammar") is not None:
            raise ValueError("give json_schema or grammar, not both")
        fields["grammar"] = Grammar.json_schema(json_schema)
    return SamplingParams(stop=stops, **fields)
