"""Server metrics, exposed in the Prometheus text format through `prometheus_client` (which escapes
every label value). Requests are counted by route template, never by the raw path, so the number of
series stays bounded whatever paths clients send."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from hetero_moe.engine.engine import EngineStats

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED = "unmatched"  # the endpoint label of every path no route serves
MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format every Prometheus reads


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
        """Count a response; `endpoint` is a route template or `UNMATCHED`, never a raw path."""
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

    def render(self, stats: EngineStats, queued: int) -> bytes:
        """The page: this server's request counters, and the engine's `stats` after its last step."""
        families: list[Metric] = []
        with self._lock:
            requests = CounterMetricFamily(
                "hetero_moe_requests", "Requests answered, by route and HTTP status.", labels=["endpoint", "status"]
            )
            for (endpoint, status), n in sorted(self.requests.items()):
                requests.add_metric([endpoint, str(status)], n)
            families.append(requests)
            families.append(
                CounterMetricFamily("hetero_moe_prompt_tokens", "Prompt tokens processed.", self.prompt_tokens)
            )
            families.append(
                CounterMetricFamily("hetero_moe_generation_tokens", "Tokens generated.", self.generation_tokens)
            )
            buckets = [(str(b), n) for b, n in zip(TTFT_BUCKETS, self.ttft_counts, strict=True)]
            families.append(
                HistogramMetricFamily(
                    "hetero_moe_time_to_first_token_seconds",
                    "Time from arrival to the first token.",
                    buckets=[*buckets, ("+Inf", self.ttft_count)],
                    sum_value=self.ttft_sum,
                )
            )
            families.append(
                _family("decode_tokens_per_second", "gauge", "Decode speed of the last request.", self.decode_tps)
            )
            cancelled = stats.cancelled_total + self.cancelled_waiting
        families.append(_family("queue_size", "gauge", "Requests waiting for the engine.", queued))
        families.append(_family("running_requests", "gauge", "Requests in the running batch.", stats.running))
        families.append(_family("cancelled_total", "counter", "Requests cancelled by a disconnect.", cancelled))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(families + _engine_families(stats)))
        return generate_latest(registry)


def _engine_families(stats: EngineStats) -> list[Metric]:
    return [
        _family(name, kind, help_text, value)
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
        )
    ]


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _family(name: str, kind: str, help_text: str, value: float) -> Metric:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(f"hetero_moe_{name}", help_text, value)
