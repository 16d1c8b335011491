"""The server's own counters, read from its Prometheus endpoint before and after each level.

What it is for: `ServerCounters.snapshot()` sums trtserve's prompt, cached-prompt
and generated token counters (over all label values, or one model's) once the
server has nothing in flight, so that the difference across a level gives the
server-side prefix-cache hit rate and token totals for that level. A server
without the endpoint (or a non-trtserve one) gives None, never an error.
Not for: per-request counts (backends.py) or the endpoint itself (metrics.py).
"""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PROMPT = "trtserve_prompt_tokens_total"
CACHED = "trtserve_cached_prompt_tokens_total"
GENERATED = "trtserve_generated_tokens_total"
IN_FLIGHT = "trtserve_requests_in_flight"
TIMEOUT_S = 5.0
SETTLE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Counters:
    prompt_tokens: float
    cached_tokens: float
    generated_tokens: float

    def hit_rate_since(self, before: Counters) -> float | None:
        prompt = self.prompt_tokens - before.prompt_tokens
        return (self.cached_tokens - before.cached_tokens) / prompt if prompt > 0 else None


def metrics_url_for(target: str) -> str:
    """trtserve's default layout (Triton's too): metrics on the gRPC port + 1."""
    host, _, port = target.rpartition(":")
    return f"http://{host}:{int(port) + 1}/metrics"


class ServerCounters:
    def __init__(self, url: str, model: str = "") -> None:
        self.url = url
        self.model = model

    def snapshot(self) -> Counters | None:
        """The counters once nothing is in flight (or after SETTLE_TIMEOUT_S); None when unreachable."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        idle_scrapes = 0
        while True:
            samples = self.scrape()
            if samples is None:
                return None
            # The in-flight gauge drops just before the request's counters are added (same finally block,
            # but the scrape runs on another thread): trust a second idle scrape, not the first.
            idle_scrapes = idle_scrapes + 1 if samples.get(IN_FLIGHT, 0.0) == 0.0 else 0
            if idle_scrapes == 2 or time.monotonic() > deadline:
                return Counters(samples.get(PROMPT, 0.0), samples.get(CACHED, 0.0), samples.get(GENERATED, 0.0))
            time.sleep(0.05)

    def available(self) -> bool:
        return self.scrape() is not None

    def scrape(self) -> dict[str, float] | None:
        """The summed samples now (no waiting), or None when unreachable."""
        try:
            with urllib.request.urlopen(self.url, timeout=TIMEOUT_S) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError, ValueError):
            return None
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in (PROMPT, CACHED, GENERATED, IN_FLIGHT) and \
                        (not self.model or sample.labels.get("model", self.model) == self.model):
                    totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
        return totals
