"""Server metrics in the Prometheus text format, kept without a client library."""

from __future__ import annotations

import threading
from collections import defaultdict

from hetero_moe.engine.engine import EngineStats

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.decode_tps = 0.0  # of the last finished request
        self.cancelled_waiting = 0  # requests whose client left before they reached the engine

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_sum += seconds
            self.ttft_count += 1
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_counts[i] += 1

    def finished(self, prompt_tokens: int, new_tokens: int, decode_seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += new_tokens
            if new_tokens > 1 and decode_seconds > 0:
                self.decode_tps = (new_tokens - 1) / decode_seconds

    def add(self, name: str, delta: int) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)

    def render(self, stats: EngineStats, queued: int) -> str:
        """The page: this server's request counters, and the engine's `stats` after its last step."""
        with self._lock:
            lines = [
                "# HELP hetero_moe_requests_total Requests answered, by endpoint and HTTP status.",
                "# TYPE hetero_moe_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'hetero_moe_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += _metric("prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens)
            lines += _metric("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
            lines += [
                "# HELP hetero_moe_time_to_first_token_seconds Time from arrival to the first token.",
                "# TYPE hetero_moe_time_to_first_token_seconds histogram",
            ]
            for bound, n in zip(TTFT_BUCKETS, self.ttft_counts, strict=True):
                lines.append(f'hetero_moe_time_to_first_token_seconds_bucket{{le="{bound}"}} {n}')
            lines.append(f'hetero_moe_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}')
            lines.append(f"hetero_moe_time_to_first_token_seconds_sum {self.ttft_sum}")
            lines.append(f"hetero_moe_time_to_first_token_seconds_count {self.ttft_count}")
            lines += _metric("decode_tokens_per_second", "gauge", "Decode speed of the last request.", self.decode_tps)
            cancelled = stats.cancelled_total + self.cancelled_waiting
            lines += _metric("queue_size", "gauge", "Requests waiting for the engine.", queued)
            lines += _metric("running_requests", "gauge", "Requests in the running batch.", stats.running)
            lines += _metric("cancelled_total", "counter", "Requests cancelled by a disconnect.", cancelled)
        for name, kind, help_text, value in (
            ("preempted_total", "counter", "Requests paused to free KV cache pages.", stats.preempted_total),
            ("kv_cache_used_tokens", "gauge", "Token slots of the KV cache pool in use.", stats.kv_cache_used_tokens),
            ("kv_cache_capacity_tokens", "gauge", "Token slots of the KV cache pool.", stats.kv_cache_capacity_tokens),
            ("steps_total", "counter", "Batched forward steps run.", stats.steps_total),
            ("step_tokens_total", "counter", "Tokens those steps ran.", stats.step_tokens_total),
            (
                "routed_expert_bytes_total",
                "counter",
                "Weight bytes the routed experts streamed: per step and layer, those of the distinct experts.",
                stats.routed_expert_bytes_total,
            ),
            ("decode_steps_total", "counter", "Steps of decode tokens only.", stats.decode_steps_total),
            ("decode_step_tokens_total", "counter", "Tokens of decode-only steps.", stats.decode_step_tokens_total),
            (
                "decode_routed_expert_bytes_total",
                "counter",
                "Weight bytes the routed experts streamed in decode-only steps.",
                stats.decode_routed_expert_bytes_total,
            ),
            (
                "prefix_lookups_total",
                "counter",
                "Requests that looked for a cached prefix.",
                stats.prefix_lookups_total,
            ),
            (
                "prefix_hit_tokens_total",
                "counter",
                "Prompt tokens read from the prefix cache instead of computed.",
                stats.prefix_hit_tokens_total,
            ),
            ("prefix_cached_pages", "gauge", "KV cache pages kept for reuse.", stats.prefix_cached_pages),
            (
                "prefix_evictions_total",
                "counter",
                "Cached pages given to other requests.",
                stats.prefix_evictions_total,
            ),
            (
                "host_tier_pages_loaded_total",
                "counter",
                "Cached pages copied back from host memory instead of recomputed.",
                stats.host_tier_pages_loaded_total,
            ),
        ):
            lines += _metric(name, kind, help_text, value)
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, value: float) -> list[str]:
    full = f"hetero_moe_{name}"
    return [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {value}"]
