"""perf_analyzer's server-side statistics reads and checks, replayed in Python, and a parser for its report.

What it is for: the statistics tests. `summarize` does what perf_analyzer 2.41 (the binary in the
tritonclient 2.41.0 wheel; triton-inference-server/client r23.12, `inference_profiler.cc` and
`client_backend/triton/triton_client_backend.cc`) does with the KServe statistics extension around each
measurement window:

* it reads `ModelStatistics` for every model (name "") when the model is an ensemble, else for the model
  and version asked;
* it keeps, per (name, version): inference / execution counts, success / queue / compute_input /
  compute_infer / compute_output counts and ns;
* for a model whose version was not given (the composing models of an ensemble: their steps say
  model_version -1), it takes the highest version whose `queue.count` grew during the window, and fails with
  "failed to find the requested model version" when none did; a given version must be present at the end;
* the window's numbers are end minus start, per model, recursively for the composing models of the
  ensemble's `ensemble_scheduling` steps;
* its report refuses a model whose compute_input / compute_infer / compute_output counts differ
  ("Server side statistics compute counts must be the same.").

`parse_report` reads the per-concurrency blocks perf_analyzer prints.
Not for: load generation (perf_analyzer itself, or the tests' own clients).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import tritonclient.grpc as tc

ModelId = tuple[str, str]


class PerfAnalyzerError(RuntimeError):
    """What perf_analyzer would stop with."""


@dataclass(frozen=True, slots=True)
class Counters:
    inference_count: int = 0
    execution_count: int = 0
    success_count: int = 0
    queue_count: int = 0
    compute_input_count: int = 0
    compute_infer_count: int = 0
    compute_output_count: int = 0
    cumm_time_ns: int = 0
    queue_time_ns: int = 0
    compute_input_time_ns: int = 0
    compute_infer_time_ns: int = 0
    compute_output_time_ns: int = 0

    def minus(self, start: Counters) -> Counters:
        return Counters(*(getattr(self, f.name) - getattr(start, f.name) for f in fields(Counters)))


@dataclass(slots=True)
class ServerSideStats:
    counters: Counters
    composing: dict[ModelId, ServerSideStats] = field(default_factory=dict)


def read_statistics(client: tc.InferenceServerClient, name: str = "", version: str = "") -> dict[ModelId, Counters]:
    """`ParseStatistics`: one ModelStatistics call, keyed by (name, version)."""
    response = client.get_inference_statistics(name, version)
    out: dict[ModelId, Counters] = {}
    for stat in response.model_stats:
        s = stat.inference_stats
        out[(stat.name, stat.version)] = Counters(
            stat.inference_count, stat.execution_count, s.success.count, s.queue.count, s.compute_input.count,
            s.compute_infer.count, s.compute_output.count, s.success.ns, s.queue.ns, s.compute_input.ns,
            s.compute_infer.ns, s.compute_output.ns)
    return out


def composing_models(client: tc.InferenceServerClient, name: str, version: str = "") -> list[ModelId]:
    """The ensemble's steps as perf_analyzer's ModelParser reads them (model_version -1 -> unspecified)."""
    config = client.get_model_config(name, version).config
    return [(step.model_name, "" if step.model_version == -1 else str(step.model_version))
            for step in config.ensemble_scheduling.step]


def server_side_status(client: tc.InferenceServerClient, model: ModelId) -> dict[ModelId, Counters]:
    """`GetServerSideStatus`: every model for an ensemble, else just the model asked."""
    if composing_models(client, *model):
        return read_statistics(client)
    return read_statistics(client, *model)


def determine_version(model: ModelId, start: dict[ModelId, Counters], end: dict[ModelId, Counters]) -> str:
    """`DetermineStatsModelVersion`."""
    name, version = model
    if version:
        if model not in end:
            raise PerfAnalyzerError("failed to find the requested model version")
        return version
    moved = [int(v) for (n, v), counters in end.items()
             if n == name and counters.queue_count > start.get((n, v), Counters()).queue_count]
    if not moved:
        raise PerfAnalyzerError("failed to find the requested model version")
    return str(max(moved))


def summarize(client: tc.InferenceServerClient, model: ModelId, start: dict[ModelId, Counters],
              end: dict[ModelId, Counters]) -> ServerSideStats:
    """`SummarizeServerStats` (recursive over composing models) plus the report's compute-count check."""
    this = (model[0], determine_version(model, start, end))
    if this not in end:
        raise PerfAnalyzerError("missing statistics for requested model")
    delta = end[this].minus(start.get(this, Counters()))
    composing = {(name, determine_version((name, version), start, end)): None
                 for name, version in composing_models(client, *model)}
    stats = ServerSideStats(delta, {m: summarize(client, m, start, end) for m in composing})
    if not stats.composing and not (delta.compute_input_count == delta.compute_infer_count
                                    == delta.compute_output_count):
        raise PerfAnalyzerError("Server side statistics compute counts must be the same.")
    return stats


@dataclass(frozen=True, slots=True)
class LevelReport:
    """One concurrency level of perf_analyzer's printed report."""

    concurrency: int
    client_request_count: int
    throughput: float                        # infer/sec, client side
    server_success_count: int
    composing_success_counts: dict[str, int]


_LEVEL = re.compile(r"^Request concurrency: (\d+)$", re.M)


def parse_report(text: str) -> list[LevelReport]:
    levels = []
    starts = [(m.start(), int(m.group(1))) for m in _LEVEL.finditer(text)]
    for i, (offset, concurrency) in enumerate(starts):
        block = text[offset:starts[i + 1][0] if i + 1 < len(starts) else len(text)]
        client, _, server = block.partition("Server:")
        own, _, composing = server.partition("Composing models:")
        per_model = dict(re.findall(r"^\s*(\w+), version: \d+\n(?:.*\n)*?\s*Successful request count: (\d+)",
                                    composing, re.M))
        levels.append(LevelReport(
            concurrency, int(_field(client, "Request count")), float(_field(client, "Throughput")),
            int(_field(own, "Successful request count")), {k: int(v) for k, v in per_model.items()}))
    return levels


def _field(block: str, label: str) -> str:
    match = re.search(rf"{label}: ([\d.]+)", block)
    if match is None:
        raise ValueError(f"perf_analyzer report: no {label!r} in {block[:400]!r}")
    return match.group(1)
