"""`hetero-moe serve`: the OpenAI API over HTTP."""

from __future__ import annotations

import argparse
from pathlib import Path

from hetero_moe.cli.common import add_model_args, batching, load
from hetero_moe.server.config import DEFAULT_MAX_REQUEST_BYTES, ServerConfig


def add_parsers(sub) -> None:
    g = sub.add_parser("serve", help="serve the OpenAI API over HTTP")
    add_model_args(g, batching=True)
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this box only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 route and /metrics")
    g.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    g.add_argument("--max-queue", type=int, default=64, help="requests that may wait (default 64)")
    g.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        help="let browser apps from this origin call the API (CORS; repeatable, '*' for any)",
    )
    g.add_argument("--reasoning-parser", choices=["deepseek-r1"], help="send <think>...</think> as reasoning_content")
    g.add_argument(
        "--allowed-hosts",
        action="append",
        default=[],
        help="a Host name to answer besides the loopback names (repeatable; '*' for any); on a loopback --host "
        "other names are refused, against DNS rebinding",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"refuse request bodies larger than this, unread (default {DEFAULT_MAX_REQUEST_BYTES >> 20} MiB)",
    )
    g.add_argument(
        "--max-prompt-bytes",
        type=int,
        help="refuse prompt text larger than this before tokenizing (default: the most that can fit the context)",
    )
    g.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    g.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from hetero_moe.server.app import create_app

    name = args.served_model_name or (Path(args.model).resolve().name if args.model else "hetero-moe-demo")
    config = ServerConfig(
        served_model_name=name,
        api_key=args.api_key,
        max_queue=args.max_queue,
        reasoning_parser=args.reasoning_parser,
        allow_origins=tuple(args.allow_origin),
        host=args.host,
        allowed_hosts=tuple(args.allowed_hosts),
        max_request_bytes=args.max_request_bytes,
        max_prompt_bytes=args.max_prompt_bytes,
        metrics_public=args.metrics_public,
    )
    with load(args, batching(args)) as llm:
        app = create_app(llm, config)
        print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (OpenAI API; Ctrl-C stops)", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0
