"""KServe ModelStatistics counters and the metadata messages derived from a model's config.

What it is for: `InferenceStats` (per model: successes, failures and their
durations, last inference time), turned into the `ModelStatistics` message
Triton clients read, and `model_metadata` / `server_metadata`, computed from a
`ModelConfig` so that metadata and config can never disagree.
Not for: Prometheus metrics (metrics.py), which cover every API.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import metadata as package_metadata

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from grpc_service.triton_schema import kserve_datatype

SERVER_NAME = "trtserve"
# The KServe / Triton protocol extensions this server implements.
EXTENSIONS = ("model_configuration", "binary_tensor_data", "parameters", "statistics")


@dataclass(slots=True)
class InferenceStats:
    num_success: int = 0
    success_ns: int = 0
    num_fail: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0

    def record(self, ok: bool, duration_ns: int) -> None:
        if ok:
            self.num_success += 1
            self.success_ns += duration_ns
        else:
            self.num_fail += 1
            self.fail_ns += duration_ns
        self.last_inference_ms = time.time_ns() // 1_000_000

    def to_proto(self, name: str) -> pb.ModelStatistics:
        stats = pb.ModelStatistics(name=name, version="1", last_inference=self.last_inference_ms,
                                   inference_count=self.num_success, execution_count=self.num_success)
        stats.inference_stats.success.count = self.num_success
        stats.inference_stats.success.ns = self.success_ns
        stats.inference_stats.fail.count = self.num_fail
        stats.inference_stats.fail.ns = self.fail_ns
        stats.inference_stats.compute_infer.count = self.num_success
        stats.inference_stats.compute_infer.ns = self.success_ns
        return stats


def model_metadata(config: mc.ModelConfig) -> pb.ModelMetadataResponse:
    platform = config.platform or config.backend
    response = pb.ModelMetadataResponse(name=config.name, versions=["1"], platform=platform)
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
