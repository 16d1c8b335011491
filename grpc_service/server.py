"""The server process: one asyncio loop running grpc.aio, one engine thread per served engine.

What it is for: `Server.run()`: listen first (health answers NOT_SERVING while
engines load), load every engine off the loop, build the Triton models, warm
each engine up with one request, then report SERVING. SIGTERM / SIGINT start a
drain: health turns NOT_SERVING, new RPCs get UNAVAILABLE, in-flight requests
may finish within `grace_period_s` (then what is left is cancelled, which
aborts it in the engine), engines stop, and `run()` returns 0.
Not for: what any RPC does (services), or option parsing (server_cli.py).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from tritonclient.grpc import service_pb2 as kserve_pb2

from grpc_service.config import ServerConfig
from grpc_service.engine_host import ServedModel
from grpc_service.handlers import RpcGuard, register_service
from grpc_service.http.app import create_app
from grpc_service.http.serve import HttpFace
from grpc_service.metrics import ServerMetrics
from grpc_service.native_service import NativeService
from grpc_service.proto import trtserve_pb2
from grpc_service.registry import ModelRegistry
from grpc_service.repository import RepositoryError, read_repository
from grpc_service.triton_models import TritonModel
from grpc_service.triton_schema import (
    ROLES,
    VISION_INPUT_NAMES,
    RepositoryNames,
    default_configs,
)
from grpc_service.thread_sched import batch_schedule_threads
from grpc_service.triton_service import TritonService
from grpc_service.visual_inputs import MediaPolicy
from runtime.config import EngineConfig

LOG = logging.getLogger(__name__)
NATIVE_SERVICE = trtserve_pb2.DESCRIPTOR.services_by_name["LLMService"]
KSERVE_SERVICE = kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAMES = (NATIVE_SERVICE.full_name, KSERVE_SERVICE.full_name)
STREAM_CLOSE_GRACE_S = 1.0      # after the drain: how long idle streams get to close by themselves
ENGINE_WATCH_PERIOD_S = 1.0


class Server:
    def __init__(self, config: ServerConfig, engine_config: EngineConfig) -> None:
        self.config = config.validate()
        self.engine_config = engine_config
        self.registry = ModelRegistry()
        self.media_policy = MediaPolicy(config.image_limits(), config.url_policy())
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.accepting = True
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._http: HttpFace | None = None
        self._grpc: grpc.aio.Server | None = None
        self._stop = asyncio.Event()
        self._metrics_httpd: WSGIServer | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        LOG.info("event loop: %s.%s", type(loop).__module__, type(loop).__name__)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            load = asyncio.create_task(self.load())
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not load.done():
                load.cancel()               # stopped while loading
            elif load.exception() is not None:
                stop.cancel()
                await load                  # raises the load error (bad engine or repository)
            else:
                if self.config.engine_process and self.config.batch_scheduling:   # the cores are started by now
                    LOG.info("%d front-end threads under SCHED_BATCH", batch_schedule_threads())
                _announce(f"ready: {', '.join(m.name for m in self.registry.served_models)}")
                watch = asyncio.create_task(self._watch_engines())
                stop.add_done_callback(lambda _: watch.cancel())
            await stop
        finally:
            await self.drain()
        return 0

    def request_stop(self) -> None:
        LOG.info("stop requested; draining")
        self._stop.set()

    async def start(self) -> None:
        cfg = self.config
        self._grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
            ("grpc.max_send_message_length", cfg.max_send_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        guard = RpcGuard(lambda: self.accepting, self.metrics.count_rpc_error)
        register_service(self._grpc, NATIVE_SERVICE, NativeService(self.registry).methods(), guard)
        register_service(self._grpc, KSERVE_SERVICE,
                         TritonService(self.registry, lambda: self.accepting).methods(), guard)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self._grpc)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._grpc.add_insecure_port(cfg.address)
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.address}")
        await self._grpc.start()
        if cfg.enable_metrics:
            self._metrics_httpd, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_httpd.server_port
        if cfg.enable_http:
            app = create_app(self.registry, lambda: self.accepting, cfg.max_receive_message_bytes,
                             self.metrics.count_rpc_error)
            self._http = HttpFace(app, cfg.host, cfg.http_port)
            self.http_port = await self._http.start()
        _announce(f"listening on {cfg.host}:{self.port} (gRPC), metrics "
                  + (f"on {cfg.host}:{self.metrics_port}/metrics" if cfg.enable_metrics else "off")
                  + (f", OpenAI HTTP on {cfg.host}:{self.http_port}" if cfg.enable_http else ""))

    async def load(self) -> None:
        started = time.monotonic()
        if self.config.model_repository is not None:
            await self._load_repository(self.config.model_repository)
        else:
            await self._load_engines(self.config.engine_dirs)
        self.registry.loading = False
        if self.config.warmup:
            for model in self.registry.served_models:
                await model.warm_up()
        else:
            for model in self.registry.served_models:
                model.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        LOG.info("serving %d engine(s), %d Triton model(s) after %.1f s", len(self.registry.served_models),
                 len(self.registry.triton_models), time.monotonic() - started)

    async def _load_engines(self, engine_dirs: tuple[Path, ...]) -> None:
        for engine_dir in engine_dirs:
            served = await self._load_engine(engine_dir)
            names = RepositoryNames() if len(engine_dirs) == 1 else RepositoryNames.prefixed(served.name)
            for role, config in zip(ROLES, default_configs(names, served.limits.max_batch_size,
                                                          str(served.engine_dir), vision=served.supports_images)):
                self.registry.add_triton(TritonModel(config, role, served))

    async def _load_repository(self, root: Path) -> None:
        entries = read_repository(root)
        engines: dict[Path, ServedModel] = {}
        for entry in entries:
            if entry.engine_dir not in engines:
                engines[entry.engine_dir] = await self._load_engine(entry.engine_dir)
            served = engines[entry.engine_dir]
            declared = sorted(VISION_INPUT_NAMES & {spec.name for spec in entry.config.input})
            if declared and not served.supports_images:
                raise RepositoryError(f"{entry.name}/config.pbtxt", f"inputs {declared} need a vision-language "
                                                                   f"engine; {served.name!r} is text-only")
            self.registry.add_triton(TritonModel(entry.config, entry.role, served))

    async def _load_engine(self, engine_dir: Path) -> ServedModel:
        LOG.info("loading engine %s", engine_dir)
        served = await ServedModel.load(engine_dir, self.engine_config, self.config.max_queue_size, self.metrics,
                                        self.media_policy, in_process=not self.config.engine_process)
        self.registry.add_served(served)
        return served

    async def _watch_engines(self) -> None:
        """An engine whose thread died makes the server unhealthy (its requests already get UNAVAILABLE)."""
        while True:
            await asyncio.sleep(ENGINE_WATCH_PERIOD_S)
            dead = [m for m in self.registry.served_models if not m.engine.is_running]
            if dead:
                for model in dead:
                    model.ready = False
                LOG.error("engine thread stopped for %s; reporting NOT_SERVING", [m.name for m in dead])
                await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                return

    async def drain(self) -> None:
        """Refuse new work, let in-flight requests finish within the grace period, then stop everything."""
        self.accepting = False
        await self.health.enter_graceful_shutdown()
        models = self.registry.served_models
        busy = sum(m.gate.in_flight for m in models)
        if busy:
            LOG.info("draining %d request(s), grace period %.1f s", busy, self.config.grace_period_s)
            try:
                await asyncio.wait_for(asyncio.gather(*(m.gate.wait_idle() for m in models)),
                                       self.config.grace_period_s)
            except asyncio.TimeoutError:
                LOG.warning("grace period over; cancelling %d request(s)", sum(m.gate.in_flight for m in models))
        if self._grpc is not None:
            await self._grpc.stop(STREAM_CLOSE_GRACE_S)
        if self._http is not None:
            await self._http.stop()
        for model in models:
            model.shutdown()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
        _announce("stopped")

    async def _set_health(self, status: int) -> None:
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, status)


def _announce(message: str) -> None:
    """One line on stdout per lifecycle change (tests and scripts wait for them)."""
    print(f"trtserve-serve: {message}", file=sys.stdout, flush=True)
