"""Per-level metrics from request records, as vLLM's serving benchmark defines them (REFERENCE.md section 5).

What it is for: `summarize` turns one level's records into a `LevelSummary`:
output tok/s = output tokens / (first send -> last completion); total tok/s adds
prompt tokens; QPS = completed requests / that time; TTFT, TPOT = (E2E - TTFT) /
(output tokens - 1) over requests with more than one output token, and E2E as
p50 / p99 / mean in milliseconds; errors counted (and the first few messages
kept); the prefix-cache hit rate from the server's counters when given, else
from per-request cached-token counts.
Not for: collecting records (loadgen.py, baseline.py) or printing (report.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from bench.backends import RequestRecord

MAX_ERROR_MESSAGES = 5


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float | None
    p99: float | None
    mean: float | None

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Percentiles:
        if not values_ms:
            return cls(None, None, None)
        array = np.asarray(values_ms, dtype=np.float64)
        return cls(float(np.percentile(array, 50)), float(np.percentile(array, 99)), float(array.mean()))


@dataclass(frozen=True, slots=True)
class LevelSummary:
    concurrency: int
    num_requests: int                   # completed without error
    num_errors: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int | None
    output_tok_s: float
    total_tok_s: float
    qps: float
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    e2e_ms: Percentiles
    prefix_cache_hit_rate: float | None
    prefix_cache_source: str | None
    partial: bool
    errors: tuple[str, ...] = ()
    server_tokens: dict[str, int] | None = None   # the server's own counters over the level (Prometheus)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["errors"] = list(self.errors)
        return data

    @classmethod
    def from_json(cls, data: dict) -> LevelSummary:
        values = dict(data)
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            values[name] = Percentiles(**values[name])
        values["errors"] = tuple(values.get("errors", ()))
        return cls(**values)


def summarize(concurrency: int, records: Sequence[RequestRecord], partial: bool,
              server_hit_rate: float | None = None) -> LevelSummary:
    ok = [r for r in records if r.ok]
    duration = (max(r.end_s for r in records) - min(r.start_s for r in records)) if records else 0.0
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    cached_tokens = sum(cached) if cached else None
    ttft = [(r.first_token_s - r.start_s) * 1e3 for r in ok if r.first_token_s is not None]
    tpot = [(r.end_s - r.first_token_s) * 1e3 / (r.output_tokens - 1)
            for r in ok if r.first_token_s is not None and r.output_tokens > 1]
    e2e = [(r.end_s - r.start_s) * 1e3 for r in ok]
    hit_rate = server_hit_rate
    source: str | None = "server metrics (trtserve_cached_prompt_tokens / trtserve_prompt_tokens)"
    if hit_rate is None and cached_tokens is not None and prompt_tokens:
        hit_rate, source = cached_tokens / prompt_tokens, "per-request cached tokens / prompt tokens"
    elif hit_rate is None:
        source = None
    errors = tuple(dict.fromkeys(r.error for r in records if r.error))[:MAX_ERROR_MESSAGES]
    per_s = 1.0 / duration if duration > 0 else 0.0
    return LevelSummary(concurrency, len(ok), len(records) - len(ok), duration, prompt_tokens, output_tokens,
                        cached_tokens, output_tokens * per_s, (prompt_tokens + output_tokens) * per_s,
                        len(ok) * per_s, Percentiles.of(ttft), Percentiles.of(tpot), Percentiles.of(e2e),
                        hit_rate, source, partial, errors)
