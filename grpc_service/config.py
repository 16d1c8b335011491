"""Server configuration: frozen defaults for the network face.

What it is for: `ServerConfig`, every option of the network face (listen
address, metrics port, queue and message limits, shutdown grace period, what
to serve, and the image policy: limits per request and image, and where image
URLs may point). Defaults live here (the image limits' are
runtime.multimodal.image_io.ImageLimits'); `from_env` lets `TRTSERVE_SERVER_*` variables
(read by `runtime.config.env_values`, the one reader) and then CLI flags
override them. Engine options (device, KV-cache size, scheduling policy) stay
in `runtime.config.EngineConfig`.
Not for: values measured at start-up (those belong to the runtime's layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from grpc_service.image_urls import UrlPolicy
from runtime.config import env_values
from runtime.errors import FieldError
from runtime.multimodal.image_io import ImageLimits

ENV_PREFIX = "TRTSERVE_SERVER_"
MIN_MESSAGE_BYTES = 1 << 16           # 64 KiB: below this even a short prompt would not fit
MAX_MESSAGE_BYTES = (1 << 31) - 1     # gRPC's own ceiling
MAX_PORT = 65535
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
_IMAGE_DEFAULTS = ImageLimits()


class ServerConfigError(FieldError):
    """A server option is out of range; `field` names it."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    engine_dirs: tuple[Path, ...] = ()        # serve these engine directories ...
    model_repository: Path | None = None      # ... or a Triton-style model repository
    host: str = "127.0.0.1"                   # 0.0.0.0 to listen on every interface
    port: int = 8001                          # gRPC (Triton's default gRPC port); 0 picks a free one
    metrics_port: int = 8002                  # Prometheus HTTP (Triton's default); 0 picks a free one
    enable_metrics: bool = True
    http_port: int = 8000                     # OpenAI-compatible HTTP (FastAPI); 0 picks a free one
    enable_http: bool = True
    max_queue_size: int = 64                  # requests waiting beyond max_batch_size, per model
    max_receive_message_bytes: int = 64 << 20
    max_send_message_bytes: int = 64 << 20
    grace_period_s: float = 30.0              # SIGTERM: how long in-flight requests may take to finish
    warmup: bool = True                       # one short request per model before reporting SERVING
    engine_process: bool = True               # each engine core in its own process (False: a thread of this one)
    batch_scheduling: bool = True             # with engine_process: front-end threads SCHED_BATCH (thread_sched.py)
    event_loop: str = "auto"                  # auto (uvloop where installed), uvloop, asyncio (event_loop.py)
    # vision-language engines (the defaults are runtime.multimodal.image_io.ImageLimits')
    max_images_per_request: int = _IMAGE_DEFAULTS.max_images_per_request    # images plus videos
    max_image_pixels: int = _IMAGE_DEFAULTS.max_image_pixels                # per image / frame, from its header
    max_image_bytes: int = _IMAGE_DEFAULTS.max_image_bytes                  # per encoded image
    max_video_frames: int = _IMAGE_DEFAULTS.max_video_frames
    allowed_image_dir: Path | None = None     # file:// URLs and paths: only inside it; None refuses them
    allow_image_url_fetch: bool = False       # http(s):// image URLs (the server then makes outgoing requests)
    image_fetch_timeout_s: float = 10.0

    def validate(self) -> ServerConfig:
        if bool(self.engine_dirs) == (self.model_repository is not None):
            raise ServerConfigError("engine_dirs", "give engine directories or a model repository (exactly one)")
        _check_port("port", self.port)
        _check_port("metrics_port", self.metrics_port)
        _check_port("http_port", self.http_port)
        if not isinstance(self.max_queue_size, int) or self.max_queue_size < 0:
            raise ServerConfigError("max_queue_size", f"must be an integer >= 0, got {self.max_queue_size!r}")
        for name in ("max_receive_message_bytes", "max_send_message_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or not MIN_MESSAGE_BYTES <= value <= MAX_MESSAGE_BYTES:
                raise ServerConfigError(name, f"must be in [{MIN_MESSAGE_BYTES}, {MAX_MESSAGE_BYTES}], got {value!r}")
        if not math.isfinite(self.grace_period_s) or not self.grace_period_s >= 0:
            raise ServerConfigError("grace_period_s", f"must be a finite number >= 0, got {self.grace_period_s}")
        if not self.host:
            raise ServerConfigError("host", "must not be empty")
        if self.event_loop not in EVENT_LOOPS:
            raise ServerConfigError("event_loop", f"must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        for name in ("max_images_per_request", "max_image_pixels", "max_image_bytes", "max_video_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServerConfigError(name, f"must be an integer >= 1, got {value!r}")
        if not math.isfinite(self.image_fetch_timeout_s) or not self.image_fetch_timeout_s > 0:
            raise ServerConfigError("image_fetch_timeout_s", f"must be a finite number > 0, got "
                                                             f"{self.image_fetch_timeout_s}")
        if self.allowed_image_dir is not None and not self.allowed_image_dir.is_dir():
            raise ServerConfigError("allowed_image_dir", f"{self.allowed_image_dir} is not a directory")
        return self

    def image_limits(self) -> ImageLimits:
        return replace(_IMAGE_DEFAULTS, max_images_per_request=self.max_images_per_request,
                       max_image_pixels=self.max_image_pixels, max_image_bytes=self.max_image_bytes,
                       max_video_frames=self.max_video_frames)

    def url_policy(self) -> UrlPolicy:
        return UrlPolicy(self.allowed_image_dir, self.allow_image_url_fetch, self.image_fetch_timeout_s,
                         max(self.max_image_bytes, _IMAGE_DEFAULTS.max_video_bytes))

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def from_env(cls, **overrides: object) -> ServerConfig:
        """Defaults, then TRTSERVE_SERVER_* environment variables, then explicit overrides (None = unset)."""
        values = env_values(cls, ENV_PREFIX, ServerConfigError)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()  # type: ignore[arg-type]


def _check_port(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PORT:
        raise ServerConfigError(name, f"must be an integer in [0, {MAX_PORT}], got {value!r}")
