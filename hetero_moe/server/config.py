"""The server's settings."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hetero_moe.engine.scheduler import SchedulerConfig
from hetero_moe.server.reasoning import REASONING_PARSERS

DEFAULT_MAX_REQUEST_BYTES = 8 << 20  # a request body: a context of 160K tokens as text or ids fits with room


def is_loopback(host: str) -> bool:
    """`localhost`, `*.localhost`, or an address of the loopback range (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_queue: int = 64
    reasoning_parser: str | None = None
    allow_origins: tuple[str, ...] = ()  # browser front ends served from other origins (CORS)
    batching: SchedulerConfig | None = None  # None: the LLM's own engine; else an engine of these settings
    host: str = "127.0.0.1"  # the address bound: on a loopback address, requests must name a loopback Host
    allowed_hosts: tuple[str, ...] = ()  # other Host names accepted ("*": any)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a body beyond this is refused (413) unread
    max_prompt_bytes: int | None = None  # prompt text beyond this is refused before tokenizing; None: what fits
    metrics_public: bool = False  # /metrics without the API key
    tokenizer_threads: int = 2  # tokenizing and chat templates run on these threads, off the event loop

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {self.reasoning_parser!r}; known: {', '.join(REASONING_PARSERS)}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}")
        if self.max_prompt_bytes is not None and self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes must be at least 1, got {self.max_prompt_bytes}")
        if self.tokenizer_threads < 1:
            raise ValueError(f"tokenizer_threads must be at least 1, got {self.tokenizer_threads}")
        object.__setattr__(self, "allowed_hosts", tuple(h.strip().lower() for h in self.allowed_hosts))

    @property
    def checks_host(self) -> bool:
        """Whether the Host (and Origin) of requests is checked: when bound to loopback (a web page must not
        reach this server through a name of its own, DNS rebinding), or when allowed hosts are listed."""
        return is_loopback(self.host) or bool(self.allowed_hosts)

    def host_allowed(self, name: str) -> bool:
        """Whether a request's Host (or Origin's) name, without its port, is one this server answers to."""
        name = name.lower().rstrip(".")
        return "*" in self.allowed_hosts or name in self.allowed_hosts or is_loopback(name)
