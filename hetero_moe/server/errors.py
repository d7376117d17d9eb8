"""API errors, and the handlers that turn exceptions into them: in each API's own error JSON, chosen by
the path (Ollama's `{"error": message}` under /api, Anthropic's under /v1/messages, OpenAI's elsewhere)."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetero_moe.server.openai_format import error_body

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client of a non-streamed request disconnected; its generation was dropped."""


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
}


def error_json(
    path: str, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None, param=None
) -> dict:
    """The error body of the API `path` belongs to."""
    if path.startswith("/api/"):
        return {"error": message}
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return error_body(message, type_, code, param)


def install_handlers(app: FastAPI) -> None:
    """Every error leaves as its API's error JSON (or a bare 499 for a client that is gone). The guard
    counts them in the metrics."""

    def respond(request: Request, status: int, body: dict, headers=None) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        body = error_json(request.url.path, e.status, e.message, e.type, e.code, e.param)
        return respond(request, e.status, body)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(e.errors())
        return respond(request, 400, error_json(request.url.path, 400, message, code="invalid_value", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # a 405 keeps its Allow header
        body = error_json(request.url.path, e.status_code, str(e.detail))
        return respond(request, e.status_code, body, getattr(e, "headers", None))

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads the body

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_json(request.url.path, 500, "internal server error", "server_error"), status_code=500)


_TYPE_TAG = re.compile(r"^([a-z-]+\[.*\]|str|int|float|bool|none|list|dict)$")  # pydantic's union member names


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One clear line and the top-level field (`param`) for pydantic's errors: the most specific error
    (the deepest location, which is the union member that came closest), its path without pydantic's
    type tags, and the message without its "Value error, " prefix."""
    if not errors:
        return "invalid request", None
    first = max(errors, key=lambda err: len(err.get("loc", ())))
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _TYPE_TAG.match(str(x))]
    if first.get("type") == "extra_forbidden":
        text = "unknown field; this server does not support it"
    elif first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    else:
        text = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{'.'.join(loc)}: {text}" if loc else text), (loc[0] if loc else None)
