"""The chat page at `/`: one static HTML page with its script and style sheet, shipped in the package
(`server/static/`), no build step and nothing fetched from elsewhere: a Content-Security-Policy lets it
load only its own files and talk only to this server. The page calls the OpenAI routes, so the API key,
when the server has one, guards what it does; the page itself asks for the key."""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FILES = {  # path -> (file in static/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
}

router = APIRouter()


@functools.cache
def static_file(name: str) -> bytes:
    return resources.files("hetero_moe.server").joinpath("static", name).read_bytes()


def _route(path: str, name: str, media_type: str) -> None:
    async def serve() -> Response:
        headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
        return Response(static_file(name), media_type=media_type, headers=headers)

    doc = {200: {"content": {media_type.split(";")[0]: {"schema": {"type": "string"}}}, "description": name}}
    router.add_api_route(path, serve, methods=["GET"], response_class=Response, responses=doc, name=name)


for _path, (_name, _media) in FILES.items():
    _route(_path, _name, _media)
