"""The server's settings."""

from __future__ import annotations

from dataclasses import dataclass

from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.server.reasoning import REASONING_PARSERS


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_queue: int = 64
    reasoning_parser: str | None = None
    allow_origins: tuple[str, ...] = ()  # browser front ends served from other origins (CORS)
    batching: SchedulerConfig | None = None  # None: the LLM's own engine; else an engine of these settings

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {self.reasoning_parser!r}; known: {', '.join(REASONING_PARSERS)}"
            )
