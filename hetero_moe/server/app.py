"""The HTTP server: the FastAPI app that ties the guard, the routes, the error handlers and the engine
worker together. Errors use OpenAI's error JSON; bad input is always a 4xx."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from hetero_moe.llm import LLM
from hetero_moe.server import anthropic, ollama, page
from hetero_moe.server.config import ServerConfig
from hetero_moe.server.errors import install_handlers
from hetero_moe.server.guard import Guard
from hetero_moe.server.metrics import Metrics
from hetero_moe.server.routes import ServerState, router
from hetero_moe.server.worker import EngineWorker

PROMPT_BYTES_SLACK = 2  # text a normalizer shrinks (NFC, stripped controls) may take more bytes per token


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    engine = llm.engine if config.batching is None else llm.new_engine(config.batching)
    worker = EngineWorker(engine, config.max_queue, Metrics())
    card = {
        "id": config.served_model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "hetero-moe",
        "max_model_len": engine.max_sequence,
    }
    # no prompt of more bytes than this can fit: every token stands for at most max_token_bytes of text
    fits = PROMPT_BYTES_SLACK * llm.prompts.max_token_bytes * engine.max_sequence
    tokenizers = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="hetero-moe-tokenize")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start(*(() if engine is llm.engine else (llm.engine,)))  # the Python API's calls go there too
        yield
        worker.stop()
        tokenizers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="hetero-moe", lifespan=lifespan, redirect_slashes=False)  # a redirect would echo the Host
    app.state.server = ServerState(
        llm, config, worker, worker.metrics, card, tokenizers, config.max_prompt_bytes or fits
    )
    app.add_middleware(Guard, config=config, metrics=worker.metrics, paths=lambda: app.openapi()["paths"])
    if config.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    install_handlers(app)
    app.include_router(router)
    app.include_router(ollama.router)
    app.include_router(anthropic.router)
    app.include_router(page.router)
    app.openapi = lambda: openapi(app, config.served_model_name)
    return app


def openapi(app: FastAPI, model: str) -> dict:
    """FastAPI's document from the same schemas the server enforces, less the 422 it never answers (a
    validation error is a 400 in OpenAI's error body, documented on each route), and with the one model
    this server serves."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version="1", routes=app.routes)
        for operations in doc["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        schemas = doc.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        requests = ("ChatCompletionRequest", "CompletionRequest", "MessagesRequest", "CountTokensRequest")
        for request in (*requests, "ChatRequest", "GenerateRequest", "ModelRequest"):
            schemas[request]["properties"]["model"]["enum"] = [model]
        app.openapi_schema = doc
    return app.openapi_schema
