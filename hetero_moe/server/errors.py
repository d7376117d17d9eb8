"""API errors in OpenAI's error JSON, the handlers that turn exceptions into them, and the key check."""

from __future__ import annotations

import hmac
import logging

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


def authorized(request: Request) -> None:
    """A dependency of the `/v1` routes: with an API key set, `Authorization: Bearer KEY` is required."""
    key = request.app.state.server.config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer KEY'.", code="invalid_api_key")


def install_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error JSON (or a bare 499 for a client that is gone), counted in
    the metrics by path and status."""

    def count(request: Request, status: int) -> None:
        request.app.state.server.metrics.request(request.url.path, status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        count(request, e.status)
        return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        count(request, 400)
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_value", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        count(request, e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone) -> Response:
        count(request, 499)  # nginx's "client closed request"; nobody reads the body
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        count(request, 500)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
