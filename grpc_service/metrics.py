"""Prometheus metrics: request outcomes and latencies, plus engine gauges read fresh at scrape time.

What it is for: `ServerMetrics` owns one `CollectorRegistry` per server (never
the process-global default registry): request counts by model, API and outcome;
TTFT, TPOT and end-to-end histograms; prompt / generated token counters; and an
`EngineCollector` that, when scraped, asks every loaded model's engine thread
for its stats directly from the scrape's HTTP thread (never through the event
loop, so a scrape does not wait behind request processing) (queue depth, running requests, KV blocks free / used / cached,
prefix-cache hit rate). `RequestTracker` records one request's timings.
Not for: serving the HTTP endpoint's lifecycle policy (server.py starts it) or
the KServe ModelStatistics counters (triton_stats.py).
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.core.engine_core import EngineStats
from runtime.outputs import RequestOutput

LOG = logging.getLogger(__name__)
SCRAPE_TIMEOUT_S = 2.0
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True, slots=True)
class EngineGaugeSource:
    """What the collector needs from one served model, without importing the model class."""

    model_name: str
    stats: Callable[[], concurrent.futures.Future[object]]     # resolves to EngineStats, from any thread
    in_flight: Callable[[], int]
    in_flight_limit: int
    kv_cache_bytes: int = 0         # the KV pool's size, fixed at start-up (EngineLayout.kv_cache_bytes)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("trtserve_requests", "Requests by model, API and outcome",
                                ("model", "api", "outcome"), registry=self.registry)
        self.ttft = Histogram("trtserve_time_to_first_token_seconds", "Time to first token",
                              ("model", "api"), buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.tpot = Histogram("trtserve_time_per_output_token_seconds", "(E2E - TTFT) / (output tokens - 1)",
                              ("model", "api"), buckets=TPOT_BUCKETS_S, registry=self.registry)
        self.e2e = Histogram("trtserve_request_latency_seconds", "End-to-end request latency",
                             ("model", "api"), buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.prompt_tokens = Counter("trtserve_prompt_tokens", "Prompt tokens of finished requests",
                                     ("model",), registry=self.registry)
        self.cached_prompt_tokens = Counter("trtserve_cached_prompt_tokens",
                                            "Prompt tokens served from the prefix cache", ("model",),
                                            registry=self.registry)
        self.generated_tokens = Counter("trtserve_generated_tokens", "Generated tokens", ("model",),
                                        registry=self.registry)
        self.rpc_errors = Counter("trtserve_rpc_errors", "RPCs that ended with an error status",
                                  ("method", "code"), registry=self.registry)
        self._engines = EngineCollector()
        self.registry.register(self._engines)

    def attach(self, source: EngineGaugeSource) -> None:
        """Report this model's engine gauges from now on."""
        self._engines.add(source)

    def count_rpc_error(self, method: str, code: str) -> None:
        self.rpc_errors.labels(method, code).inc()

    def track(self, model_name: str, api: str) -> RequestTracker:
        return RequestTracker(self, model_name, api, time.monotonic())

    def count_refusal(self, model_name: str, api: str, outcome: str) -> None:
        """A request refused before it reached an engine (bad input, queue full, unknown model)."""
        self.requests.labels(model_name, api, outcome).inc()


@dataclass(slots=True)
class RequestTracker:
    metrics: ServerMetrics
    model_name: str
    api: str
    start_s: float
    first_token_s: float | None = None
    num_output_tokens: int = 0
    last_output: RequestOutput | None = field(default=None, repr=False)

    def on_output(self, output: RequestOutput) -> None:
        if output.token_ids and self.first_token_s is None:
            self.first_token_s = time.monotonic()
        self.num_output_tokens += len(output.token_ids)
        self.last_output = output

    def finish(self, outcome: str) -> None:
        m = self.metrics
        end_s = time.monotonic()
        m.requests.labels(self.model_name, self.api, outcome).inc()
        m.e2e.labels(self.model_name, self.api).observe(end_s - self.start_s)
        if self.first_token_s is not None:
            m.ttft.labels(self.model_name, self.api).observe(self.first_token_s - self.start_s)
            if self.num_output_tokens > 1:
                m.tpot.labels(self.model_name, self.api).observe(
                    (end_s - self.first_token_s) / (self.num_output_tokens - 1))
        m.generated_tokens.labels(self.model_name).inc(self.num_output_tokens)
        if self.last_output is not None and self.last_output.finished:
            usage = self.last_output.usage
            m.prompt_tokens.labels(self.model_name).inc(usage.prompt_tokens)
            m.cached_prompt_tokens.labels(self.model_name).inc(usage.cached_tokens)


class EngineCollector(Collector):
    """Gauges read from each engine thread at scrape time (the scrape runs on the HTTP thread)."""

    def __init__(self) -> None:
        self._sources: list[EngineGaugeSource] = []

    def add(self, source: EngineGaugeSource) -> None:
        self._sources.append(source)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families = _families()
        for source in list(self._sources):
            stats = self._fetch(source)
            name = source.model_name
            families["in_flight"].add_metric([name], source.in_flight())
            families["in_flight_limit"].add_metric([name], source.in_flight_limit)
            families["kv_bytes"].add_metric([name], source.kv_cache_bytes)
            if stats is None:
                continue
            families["queue"].add_metric([name], stats.num_waiting)
            families["running"].add_metric([name], stats.num_running)
            families["kv_total"].add_metric([name], stats.kv.total_num_blocks)
            for state, value in (("free", stats.kv.num_free_blocks), ("used", stats.kv.num_used_blocks),
                                 ("cached", stats.kv.num_cached_blocks)):
                families["kv"].add_metric([name, state], value)
            families["hit_rate"].add_metric([name], stats.kv.hit_rate)
            families["steps"].add_metric([name], stats.num_steps)
            families["preemptions"].add_metric([name], stats.num_preemptions)
        yield from families.values()

    @staticmethod
    def _fetch(source: EngineGaugeSource) -> EngineStats | None:
        try:
            stats = source.stats().result(timeout=SCRAPE_TIMEOUT_S)
            return stats if isinstance(stats, EngineStats) else None
        except Exception:  # a stopped engine must not break the scrape
            LOG.debug("engine stats unavailable for %s", source.model_name, exc_info=True)
            return None


def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
    return {
        "in_flight": GaugeMetricFamily("trtserve_requests_in_flight", "Requests admitted and not finished",
                                       labels=["model"]),
        "in_flight_limit": GaugeMetricFamily("trtserve_requests_in_flight_limit",
                                             "Admission limit (max_batch_size + max_queue_size)", labels=["model"]),
        "queue": GaugeMetricFamily("trtserve_queue_depth", "Requests waiting for the engine", labels=["model"]),
        "running": GaugeMetricFamily("trtserve_requests_running", "Requests in the running batch",
                                     labels=["model"]),
        "kv_bytes": GaugeMetricFamily("trtserve_kv_cache_bytes", "KV-cache pool size in bytes (set at start-up; "
                                      "capped by kv_cache_max_bytes)", labels=["model"]),
        "kv_total": GaugeMetricFamily("trtserve_kv_blocks_total", "KV-cache blocks in the pool", labels=["model"]),
        "kv": GaugeMetricFamily("trtserve_kv_blocks", "KV-cache blocks by state (free includes evictable)",
                                labels=["model", "state"]),
        "hit_rate": GaugeMetricFamily("trtserve_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache",
                                      labels=["model"]),
        "steps": CounterMetricFamily("trtserve_engine_steps", "Engine steps run", labels=["model"]),
        "preemptions": CounterMetricFamily("trtserve_preemptions", "Requests preempted", labels=["model"]),
    }
