"""The HTTP server: settings, and the FastAPI app that ties the routes, the error handlers and the
engine worker together. Errors use OpenAI's error JSON; bad input is always a 4xx."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from hetero_moe.llm import LLM
from hetero_moe.server.config import ServerConfig
from hetero_moe.server.errors import install_handlers
from hetero_moe.server.metrics import Metrics
from hetero_moe.server.routes import ServerState, router
from hetero_moe.server.worker import EngineWorker


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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="hetero-moe", lifespan=lifespan)
    app.state.server = ServerState(llm, config, worker, worker.metrics, card)
    if config.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    install_handlers(app)
    app.include_router(router)
    return app
