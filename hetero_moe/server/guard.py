"""The checks every HTTP request passes before any handler reads it, in this order:

1. Host and Origin: bound to a loopback address, the server answers only requests that name it by a
   loopback name (or one of `--allowed-hosts`), so a web page cannot reach it through a name of its own
   (DNS rebinding), and a browser page from another origin cannot post to it (CSRF).
2. The API key, on `/v1`, `/api` and (unless public) `/metrics`, before the body is read.
3. The body's size: refused from its Content-Length, or while it is read, past `--max-request-bytes`.

It also counts every response by route template and status for `/metrics`, whoever answered it: a
handler, an error handler or this guard. The template is the route's (`/v1/models/{model_id}`), for a
request refused here the documented path it matches; a path no route serves counts as `unmatched`.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hetero_moe.server.config import ServerConfig
from hetero_moe.server.errors import error_json
from hetero_moe.server.metrics import UNMATCHED, Metrics

log = logging.getLogger(__name__)

KEYED_PREFIXES = ("/v1", "/api")  # the APIs; /metrics too unless public


class Guard:
    def __init__(
        self, app: ASGIApp, config: ServerConfig, metrics: Metrics, paths: Callable[[], Iterable[str]]
    ) -> None:
        self.app, self.config, self.metrics, self.paths = app, config, metrics, paths
        self._templates: list[tuple[str, re.Pattern[str]]] | None = None  # the documented paths, compiled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.request(self._endpoint(scope), message["status"])
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await _send_error(counted, scope["path"], *refusal)
            return
        body = await self._read_body(scope, receive)
        if body is None:
            limit = self.config.max_request_bytes
            await _send_error(
                counted,
                scope["path"],
                413,
                f"the request body is larger than {limit} bytes (--max-request-bytes)",
                "request_too_large",
            )
            return
        try:
            await self.app(scope, _replay(body, receive), counted)
        except Exception:
            if not started:  # the outermost handler answers 500, past this counter
                self.metrics.request(self._endpoint(scope), 500)
            raise

    def _endpoint(self, scope: Scope) -> str:
        """The route template of a request: the router's match (it sets scope["route"]), else the
        documented path it fits, else `unmatched`."""
        route = scope.get("route")
        if route is not None:
            return getattr(route, "path_format", None) or getattr(route, "path", UNMATCHED)
        if self._templates is None:
            self._templates = [(path, compile_path(path)[0]) for path in self.paths()]
        return next((path for path, regex in self._templates if regex.match(scope["path"])), UNMATCHED)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        """(status, message, code) of a request refused before its body is read, or None."""
        headers = _headers(scope)
        config = self.config
        if config.checks_host:
            if not config.host_allowed(_host_name(headers.get("host", ""))):
                return 403, "this server does not answer to that Host name (--allowed-hosts)", "host_not_allowed"
            origin = headers.get("origin")
            if origin is not None and not self._origin_allowed(origin):
                return 403, "requests from that Origin are not allowed (--allow-origin)", "origin_not_allowed"
        path = scope["path"]
        keyed = path.startswith(KEYED_PREFIXES) or (path == "/metrics" and not config.metrics_public)
        if config.api_key is not None and keyed and scope["method"] != "OPTIONS":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
                token = headers.get("x-api-key", "")
            if not hmac.compare_digest(token.strip().encode("utf-8", "replace"), config.api_key.encode()):
                return (
                    401,
                    "Incorrect or missing API key; send 'Authorization: Bearer KEY' (or 'x-api-key: KEY').",
                    "invalid_api_key",
                )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_request_bytes:
            return (
                413,
                f"the request body is larger than {config.max_request_bytes} bytes (--max-request-bytes)",
                "request_too_large",
            )
        return None

    def _origin_allowed(self, origin: str) -> bool:
        allowed = self.config.allow_origins
        if "*" in allowed or origin in allowed:
            return True
        try:
            name = urlsplit(origin).hostname
        except ValueError:
            return False
        return name is not None and self.config.host_allowed(name)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it grows past the limit (the rest is never read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_request_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body read already, then the client's own messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _host_name(host: str) -> str:
    """The name in a Host header, without the port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


async def _send_error(send: Send, path: str, status: int, message: str, code: str) -> None:
    body = json.dumps(error_json(path, status, message, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
