"""Runtime configuration: frozen defaults, and the only place environment variables are read (`env_values`).

What it is for: `EngineConfig` (how to serve an engine directory: device,
KV-cache size, scheduling policy and limits) and `EngineLayout` (what was
measured at start-up: number of KV blocks). The layout is never written back
into the config.
Not for: build settings (those are in engine.json) or wire options.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from runtime.errors import FieldError

# Who fits in KV memory (runtime/core/scheduler.py implements both): admit while blocks are free and
# preempt when short, or admit only what can run to max_tokens and never preempt.
MAX_UTILIZATION = "max_utilization"
GUARANTEED_NO_EVICT = "guaranteed_no_evict"
CAPACITY_POLICIES = (MAX_UTILIZATION, GUARANTEED_NO_EVICT)
VISION_BACKENDS = ("auto", "onnxruntime", "pytorch")
OP_BACKENDS = ("auto", "reference", "cpu", "triton")      # plugins/registry.py's backends
OVERLAP_MODES = ("auto", "on", "off")                     # runtime/core/overlap.py: schedule step N+1 while N runs
ENV_PREFIX = "TRTSERVE_"


class EngineConfigError(FieldError):
    """An engine setting is out of range; `field` names it."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    device: str = "auto"                       # auto | cpu | cuda | cuda:N
    num_kv_blocks: int | None = None           # None: sized from memory (below) and limits
    kv_cache_memory_gib: float = 2.0           # upper bound for the KV pool on CPU
    gpu_memory_fraction: float = 0.9           # share of total GPU memory for weights + profiled peak + KV pool
    kv_cache_max_bytes: int | None = None      # hard cap on the KV pool in bytes, on every device
    capacity_policy: str = MAX_UTILIZATION      # one of CAPACITY_POLICIES
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_batch_size: int | None = None          # None: the engine's build limit
    max_num_tokens: int | None = None          # None: the engine's build limit
    seed: int = 0                              # stream for requests without their own seed
    vision_backend: str = "auto"               # auto (vision_encoder.auto_backend) | onnxruntime | pytorch
    max_encoder_patches: int = 16384           # vision patches per encoder call (batched across requests)
    encoder_cache_tokens: int = 16384          # vision embeddings (LLM tokens) kept for reuse, across requests
    op_backend: str = "auto"                   # auto (Triton on CUDA, cpu on CPU) | reference | cpu | triton
    enable_cuda_graphs: bool = True            # CUDA: decode steps replay graphs captured at start-up
    max_cuda_graph_batch_size: int = 256       # largest decode batch captured (larger ones run eagerly)
    overlap: str = "auto"                      # auto | on | off: schedule and build step N+1 while step N runs
    cpu_threads: int = 0                       # torch threads of the engine on CPU; 0 auto: per step in the served
                                               # core process (runtime/core/thread_policy.py), alone torch's default

    def validate(self) -> EngineConfig:
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise EngineConfigError("capacity_policy",
                                    f"must be one of {CAPACITY_POLICIES}, got {self.capacity_policy!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise EngineConfigError("num_kv_blocks", f"must be >= 1, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise EngineConfigError("gpu_memory_fraction", "must be in (0, 1]")
        if not self.kv_cache_memory_gib > 0:
            raise EngineConfigError("kv_cache_memory_gib", "must be > 0")
        if self.kv_cache_max_bytes is not None and self.kv_cache_max_bytes < 1:
            raise EngineConfigError("kv_cache_max_bytes", f"must be >= 1, got {self.kv_cache_max_bytes}")
        if self.op_backend not in OP_BACKENDS:
            raise EngineConfigError("op_backend", f"must be one of {OP_BACKENDS}, got {self.op_backend!r}")
        for name in ("max_batch_size", "max_num_tokens", "max_encoder_patches", "max_cuda_graph_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EngineConfigError(name, f"must be >= 1, got {value}")
        if self.encoder_cache_tokens < 0:
            raise EngineConfigError("encoder_cache_tokens", f"must be >= 0, got {self.encoder_cache_tokens}")
        if self.cpu_threads < 0:
            raise EngineConfigError("cpu_threads", f"must be >= 0 (0: auto, N: N threads), got {self.cpu_threads}")
        if self.overlap not in OVERLAP_MODES:
            raise EngineConfigError("overlap", f"must be one of {OVERLAP_MODES}, got {self.overlap!r}")
        if self.vision_backend not in VISION_BACKENDS:
            raise EngineConfigError("vision_backend", f"must be one of {VISION_BACKENDS}, got {self.vision_backend!r}")
        return self

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @classmethod
    def from_env(cls, **overrides: object) -> EngineConfig:
        """Defaults, then TRTSERVE_* environment variables, then explicit overrides."""
        values = env_values(cls, ENV_PREFIX, EngineConfigError)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class EngineLayout:
    """Measured at start-up; read-only afterwards."""

    device: torch.device
    num_kv_blocks: int
    tokens_per_block: int
    kv_bytes_per_block: int
    kv_sizing: str = ""                        # how num_kv_blocks was chosen, for the start-up report
    profiled_peak_bytes: int | None = None     # CUDA: weights + activations of a max_num_tokens forward
    cuda_graph_batch_sizes: tuple[int, ...] = ()   # decode batch sizes with a captured graph

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_kv_blocks * self.kv_bytes_per_block


def env_values(cls: type, prefix: str, error: type[FieldError]) -> dict[str, object]:
    """Fields of dataclass `cls` given as PREFIX + FIELD environment variables, parsed by their annotation.

    The only reader of environment variables in trtserve; `error(field, message)`
    is the caller's FieldError subclass, raised for a value that does not parse.
    """
    values: dict[str, object] = {}
    for field_ in fields(cls):
        raw = os.environ.get(prefix + field_.name.upper())
        if raw is not None:
            try:
                values[field_.name] = _parse(raw, str(field_.type))
            except ValueError:
                raise error(field_.name, f"cannot parse {prefix}{field_.name.upper()}={raw!r}") from None
    return values


def _parse(raw: str, type_name: str) -> object:
    if "tuple" in type_name:
        return tuple(Path(p) for p in raw.split(os.pathsep) if p)
    if "Path" in type_name:
        return Path(raw)
    if "bool" in type_name:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if "int" in type_name:
        return int(raw)
    if "float" in type_name:
        return float(raw)
    return raw
