"""`hetero-moe batch`: offline throughput over a prompt file, through the same engine as the server.

Each input line is a JSON object: `{"id", "prompt" | "messages", sampling fields}`. Each output line
is `{"id", "text", "prompt_tokens", "completion_tokens", "finish_reason"}` (or `{"id", "error",
"finish_reason": "error"}` for a prompt that does not fit the context), in input order, flushed as
soon as it and every line before it are done. A run that is interrupted resumes: ids already in the
output are skipped (a last line cut short by the interruption is dropped and redone). Every input line
is checked before the model loads, so a bad line is an error naming its line number and nothing in
the output is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm import tqdm

from hetero_moe.cli.common import add_model_args, add_sampling_args, batching, load, sampling
from hetero_moe.engine.request import Completion, ContextLengthError, StepOutput
from hetero_moe.engine.sampler import SamplingParams

LINE_FIELDS = {"id", "prompt", "messages"}
SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


@dataclass(frozen=True)
class Item:
    line: int  # 1-based, in the input file
    id: str | int
    prompt: str | list[dict]  # text, or chat messages
    params: SamplingParams


def add_parser(sub) -> None:
    b = sub.add_parser("batch", help="run a JSONL file of prompts through the model, results to a JSONL file")
    add_model_args(b, batching=True)
    add_sampling_args(b, max_tokens=256, temperature=1.0)
    b.add_argument("--input", required=True, help='JSONL: {"id", "prompt" | "messages", sampling fields} per line')
    b.add_argument("--output", required=True, help="JSONL results, one per input line; an existing file is resumed")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    defaults = sampling(args)
    items = read_items(Path(args.input), defaults)
    out_path = Path(args.output)
    done = finished_ids(out_path)
    todo = [item for item in items if item.id not in done]
    with out_path.open("a", encoding="utf-8") as out:  # fails now, before the model loads, if it cannot be written
        if not todo:
            print(f"all {len(items)} prompts are already in {out_path}", file=sys.stderr)
            return 0
        with load(args, batching(args)) as llm:
            window = 2 * llm.engine.config.max_batch  # requests kept in the engine: a full batch and its successors
            _run(llm, todo, out, window)
    return 0


def read_items(path: Path, defaults: SamplingParams) -> list[Item]:
    items: list[Item] = []
    seen: set = set()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = _parse(line, n, defaults, path)
            if item.id in seen:
                raise ValueError(f"{path}:{n}: id {item.id!r} appears twice")
            seen.add(item.id)
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def _parse(line: str, n: int, defaults: SamplingParams, path: Path) -> Item:
    where = f"{path}:{n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a line must be a JSON object")
    unknown = sorted(set(obj) - LINE_FIELDS - SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; accepted: id, prompt or messages, and sampling fields")
    if not isinstance(obj.get("id"), str | int) or isinstance(obj.get("id"), bool):
        raise ValueError(f'{where}: "id" (a string or an integer) is required')
    if ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f'{where}: give exactly one of "prompt" (text) or "messages" (a chat)')
    prompt = obj.get("prompt", obj.get("messages"))
    if "prompt" in obj and not (isinstance(prompt, str) and prompt):
        raise ValueError(f'{where}: "prompt" must be non-empty text')
    if "messages" in obj and not (
        isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt)
    ):
        raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    overrides = {k: v for k, v in obj.items() if k in SAMPLING_FIELDS}
    if isinstance(overrides.get("stop"), str):
        overrides["stop"] = (overrides["stop"],)
    try:
        params = SamplingParams(**{**{f.name: getattr(defaults, f.name) for f in fields(defaults)}, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return Item(n, obj["id"], prompt, params)


def finished_ids(path: Path) -> set:
    """Ids already in the output; a last line cut short (an interrupted run) is removed."""
    if not path.exists():
        return set()
    ids = set()
    with path.open("rb+") as f:
        data = f.read()
        keep = 0
        for raw in data.splitlines(keepends=True):
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                if keep + len(raw) == len(data):  # only the last line may be cut short
                    break
                raise ValueError(f"{path}: a line in the middle is not valid JSON; not resuming from it") from None
            ids.add(record["id"])
            keep += len(raw)
        if keep < len(data):
            f.truncate(keep)
    return ids


def _run(llm, todo: list[Item], out, window: int) -> None:
    engine = llm.engine
    pending = deque(todo)
    active: dict[int, tuple[Item, list[int], list[StepOutput]]] = {}  # request id -> (item, prompt ids, steps)
    results: dict[int, dict] = {}  # index in todo -> output record, until the lines before it are written
    position = {item.line: i for i, item in enumerate(todo)}
    written = 0
    tokens, start = 0, time.monotonic()
    with tqdm(total=len(todo), desc="batch", unit="prompt", file=sys.stderr) as bar:
        while written < len(todo):
            while pending and len(active) < window:
                item = pending.popleft()
                ids = llm.chat_ids(item.prompt) if isinstance(item.prompt, list) else llm.encode(item.prompt)
                try:
                    active[engine.add_request(ids, item.params)] = (item, ids, [])
                except ContextLengthError as e:  # this prompt cannot run: its line says why, the rest go on
                    results[position[item.line]] = {"id": item.id, "error": str(e), "finish_reason": "error"}
            for event in engine.step():
                item, ids, steps = active[event.request_id]
                if isinstance(event.output, BaseException):
                    raise event.output
                steps.append(event.output)
                tokens += 1
                if event.finished:
                    del active[event.request_id]
                    results[position[item.line]] = _record(item, Completion.of(ids, steps))
            while written in results:
                out.write(json.dumps(results.pop(written), ensure_ascii=False) + "\n")
                out.flush()
                written += 1
                bar.update(1)
            bar.set_postfix_str(f"{tokens / max(time.monotonic() - start, 1e-9):.1f} tok/s", refresh=False)


def _record(item: Item, c: Completion) -> dict:
    return {
        "id": item.id,
        "text": c.text,
        "prompt_tokens": len(c.prompt_token_ids),
        "completion_tokens": len(c.token_ids),
        "finish_reason": c.finish_reason,
    }
