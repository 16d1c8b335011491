"""Running the OpenAI-compatible app with uvicorn inside the gRPC server's event loop.

What it is for: `HttpFace`, which binds the HTTP port itself (so port 0 picks
a free one and the caller learns which), serves the ASGI app on the running
loop without taking over the process's signal handlers (the server's drain
owns SIGTERM / SIGINT), and stops it after the drain.
Not for: the routes (app.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

STARTUP_POLL_S = 0.01
SHUTDOWN_GRACE_S = 1


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:      # signals belong to grpc_service.server.Server
        yield


class HttpFace:
    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self._server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                              timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto IPPROTO_TCP: asyncio then sets TCP_NODELAY on every accepted connection (it checks the proto);
        # without it, a keep-alive response's second write waits ~40 ms for the client's delayed ACK
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self.requested_port} (HTTP)") from None
        sock.listen(1024)
        sock.setblocking(False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                await self._task                  # raises what stopped it
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(STARTUP_POLL_S)
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._socket is not None:
            self._socket.close()
