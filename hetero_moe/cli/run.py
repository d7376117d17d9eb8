"""`hetero-moe generate` (complete a raw prompt), `chat` (in the terminal) and `batch` (a prompt file)."""

from __future__ import annotations

import argparse
import json
import sys

from hetero_moe.cli import batch
from hetero_moe.cli.common import add_model_args, add_sampling_args, load, sampling
from hetero_moe.engine.request import ContextLengthError


def add_parsers(sub) -> None:
    g = sub.add_parser("generate", help="complete a raw prompt")
    add_model_args(g)
    add_sampling_args(g, max_tokens=256, temperature=1.0)
    g.add_argument("--prompt", required=True, help="the text to complete (no chat template)")
    g.add_argument(
        "--json", action="store_true", help='print {"prompt_token_ids", "token_ids", "text"} as the only stdout'
    )
    g.set_defaults(func=generate)

    c = sub.add_parser("chat", help="chat in the terminal")
    add_model_args(c)
    add_sampling_args(c, max_tokens=512, temperature=0.7)
    c.add_argument("--system", help="system prompt")
    c.set_defaults(func=chat)

    batch.add_parser(sub)


def generate(args: argparse.Namespace) -> int:
    params = sampling(args)
    with load(args) as llm:
        if args.json:
            c = llm.generate(args.prompt, params)
            fields = {"prompt_token_ids": c.prompt_token_ids, "token_ids": c.token_ids, "text": c.text}
            print(json.dumps({**fields, "finish_reason": c.finish_reason}))
            return 0
        for step in llm.stream(args.prompt, params):
            print(step.text, end="", flush=True)
        print()
    return 0


def chat(args: argparse.Namespace) -> int:
    params = sampling(args)
    with load(args) as llm:
        base = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(base)
        print("chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                messages = list(base)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            parts = []
            try:
                for step in llm.stream(llm.chat_ids(messages), params):
                    parts.append(step.text)
                    print(step.text, end="", flush=True)
            except ContextLengthError as e:
                print(f"\nerror: {e}; /reset to start over", file=sys.stderr)
                messages.pop()
                continue
            print()
            messages.append({"role": "assistant", "content": "".join(parts)})
