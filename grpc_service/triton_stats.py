"""KServe ModelStatistics counters, kept as Triton keeps them, and the metadata messages derived from a config.

What it is for: `InferenceStats`, one per Triton model (version "1"): per
request `success` / `fail` (count and ns, request start to end), the phases of
a successful one (`queue`, `compute_input`, `compute_infer`, `compute_output`,
count and ns), `inference_count`, `execution_count` (batch 1: one each per
successful request) and `last_inference` (ms since the epoch); all counts of
one success move together, so perf_analyzer's "compute counts must be the
same" check always holds. `RequestClock` splits one request's time on one model
into those phases as it runs. `model_metadata` / `server_metadata` are computed
from a `ModelConfig`, so that metadata and config can never disagree.

Which requests count where (triton_models.py records them): a request to a
model counts on that model, through ModelInfer or ModelStreamInfer alike; a
request to `ensemble` also counts on its composing models as Triton's ensemble
scheduler would run them: one `preprocessing` execution (tokenization), one
`tensorrt_llm` execution (queue = the engine's queue time) and one
`postprocessing` execution per response sent. perf_analyzer finds the version
whose `queue.count` moved during its window, for the model and each composing
model, so every success counts a queue entry, even one of 0 ns.
Not for: Prometheus metrics (metrics.py), which cover every API, the native one included.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import metadata as package_metadata

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from grpc_service.triton_schema import kserve_datatype

SERVER_NAME = "trtserve"
MODEL_VERSION = "1"
# The KServe / Triton protocol extensions this server implements.
EXTENSIONS = ("model_configuration", "binary_tensor_data", "parameters", "statistics")


@dataclass(slots=True)
class StatDuration:
    """A count and the nanoseconds summed over it (KServe `StatisticDuration`)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(ns, 0)

    def write(self, target: pb.StatisticDuration) -> None:
        target.count = self.count
        target.ns = self.ns


@dataclass(frozen=True, slots=True)
class Execution:
    """One successful request's time on one model, in ns: the whole request and its phases."""

    total_ns: int
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0

    @classmethod
    def compute_only(cls, ns: int) -> Execution:
        """A step that never waits and has no input / output stage of its own (all compute_infer)."""
        return cls(total_ns=ns, compute_infer_ns=ns)


@dataclass(slots=True)
class InferenceStats:
    success: StatDuration = field(default_factory=StatDuration)
    fail: StatDuration = field(default_factory=StatDuration)
    queue: StatDuration = field(default_factory=StatDuration)
    compute_input: StatDuration = field(default_factory=StatDuration)
    compute_infer: StatDuration = field(default_factory=StatDuration)
    compute_output: StatDuration = field(default_factory=StatDuration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0

    def record_success(self, execution: Execution) -> None:
        self.success.add(execution.total_ns)
        self.queue.add(execution.queue_ns)
        self.compute_input.add(execution.compute_input_ns)
        self.compute_infer.add(execution.compute_infer_ns)
        self.compute_output.add(execution.compute_output_ns)
        self.inference_count += 1          # batch size 1 per request
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, total_ns: int) -> None:
        self.fail.add(total_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def to_proto(self, name: str) -> pb.ModelStatistics:
        stats = pb.ModelStatistics(name=name, version=MODEL_VERSION, last_inference=self.last_inference_ms,
                                   inference_count=self.inference_count, execution_count=self.execution_count)
        inference = stats.inference_stats
        for source, target in ((self.success, inference.success), (self.fail, inference.fail),
                               (self.queue, inference.queue), (self.compute_input, inference.compute_input),
                               (self.compute_infer, inference.compute_infer),
                               (self.compute_output, inference.compute_output)):
            source.write(target)
        return stats


class RequestClock:
    """One request's time on one model, split into Triton's phases while it runs, recorded once at the end.

    `input_done()` closes compute_input (request start -> inputs read); `queued(ns)` is time the request
    waited for the engine; `output(ns)` adds time spent encoding responses; compute_infer is the rest.
    """

    __slots__ = ("stats", "start_ns", "_input_ns", "_queue_ns", "_output_ns", "_recorded")

    def __init__(self, stats: InferenceStats) -> None:
        self.stats = stats
        self.start_ns = time.monotonic_ns()
        self._input_ns = 0
        self._queue_ns = 0
        self._output_ns = 0
        self._recorded = False

    def input_done(self) -> None:
        self._input_ns = time.monotonic_ns() - self.start_ns

    def queued(self, ns: int) -> None:
        self._queue_ns += max(ns, 0)

    def output(self, ns: int) -> None:
        self._output_ns += max(ns, 0)

    def finish(self, ok: bool) -> None:
        """Record the request (once; later calls do nothing)."""
        if self._recorded:
            return
        self._recorded = True
        total = time.monotonic_ns() - self.start_ns
        if not ok:
            self.stats.record_failure(total)
            return
        # phases measured on other clocks (the engine's queue time) may overlap: infer never goes negative,
        # and the phases never add up to more than the request took
        queue = min(self._queue_ns, max(total - self._input_ns - self._output_ns, 0))
        infer = max(total - self._input_ns - queue - self._output_ns, 0)
        self.stats.record_success(Execution(total, queue, self._input_ns, infer, self._output_ns))


def model_metadata(config: mc.ModelConfig) -> pb.ModelMetadataResponse:
    platform = config.platform or config.backend
    response = pb.ModelMetadataResponse(name=config.name, versions=[MODEL_VERSION], platform=platform)
    batch = [-1] if config.max_batch_size > 0 else []
    for spec in config.input:
        response.inputs.add(name=spec.name, datatype=kserve_datatype(spec.data_type), shape=batch + list(spec.dims))
    for spec in config.output:
        response.outputs.add(name=spec.name, datatype=kserve_datatype(spec.data_type), shape=batch + list(spec.dims))
    return response


def server_metadata() -> pb.ServerMetadataResponse:
    try:
        version = package_metadata.version(SERVER_NAME)
    except package_metadata.PackageNotFoundError:
        version = "unknown"
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=version, extensions=list(EXTENSIONS))
