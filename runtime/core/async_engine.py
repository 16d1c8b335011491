"""AsyncEngine: the asyncio face of EngineCore, with one engine thread that owns it.

What it is for: `generate(request) -> AsyncIterator[RequestOutput]` and
`abort(request_id)` for asyncio callers (the gRPC service, the CLI). Commands
reach the engine thread through a thread-safe queue; outputs come back to each
request's asyncio queue through `loop.call_soon_threadsafe`. Nothing but the
engine thread touches the scheduler, the KV cache or the model.
Not for: validation of wire input (grpc_service) or the step logic (engine_core).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from runtime.core.engine_core import EngineCore, EngineRequest, EngineStats
from runtime.outputs import RequestOutput

LOG = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


@dataclass(frozen=True, slots=True)
class _Add:
    request: EngineRequest
    deliver: Callable[[RequestOutput | BaseException], None]


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[[EngineCore], object]
    deliver: Callable[[object], None]


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._delivery: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trtserve-engine", daemon=True)
        self._thread.start()

    # --------------------------------------------------------- asyncio side

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; admission errors are raised from the first iteration.

        Leaving the iteration early (break, cancellation, client gone) aborts the request.
        """
        if self._stopped.is_set():
            raise EngineDeadError("engine is not running")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def deliver(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        self._commands.put(_Add(request, deliver))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    async def call(self, fn: Callable[[EngineCore], object]) -> object:
        """Run `fn(core)` on the engine thread between steps (stats, cache resets)."""
        return await asyncio.wrap_future(self.call_threadsafe(fn))

    def call_threadsafe(self, fn: Callable[[EngineCore], object]) -> concurrent.futures.Future[object]:
        """`call` for any thread, no event loop needed (a metrics scrape must not wait behind the loop)."""
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        if self._stopped.is_set():             # nobody would ever run it
            future.set_exception(EngineDeadError("engine is not running"))
            return future

        def settle(value: object) -> None:
            if future.done():
                return
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)

        self._commands.put(_Call(fn, settle))
        return future

    async def stats(self) -> EngineStats:
        return await self.call(lambda core: core.stats())  # type: ignore[return-value]

    def shutdown(self, timeout: float = 10.0) -> None:
        self._commands.put(None)
        self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return not self._stopped.is_set()

    # ------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            while True:
                block = not self.core.has_unfinished()
                if not self._drain(block):
                    break
                if self.core.has_unfinished():
                    for out in self.core.step():
                        self._send(out)
        except BaseException:  # the loop itself broke: fail everyone, say so once
            LOG.exception("engine thread stopped")
        finally:
            self._stopped.set()
            for deliver in self._delivery.values():
                deliver(EngineDeadError("engine stopped"))
            self._delivery.clear()

    def _drain(self, block: bool) -> bool:
        """Apply pending commands; wait for one if idle. False means shut down."""
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while command is not None:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _apply(self, command: _Add | _Abort | _Call) -> None:
        if isinstance(command, _Add):
            try:
                self.core.add_request(command.request)
            except ValueError as exc:
                command.deliver(exc)
                return
            self._delivery[command.request.request_id] = command.deliver
        elif isinstance(command, _Abort):
            out = self.core.abort(command.request_id)
            if out is not None:
                self._send(out)
        else:
            try:
                command.deliver(command.fn(self.core))
            except Exception as exc:  # a bad call must not stop the engine
                command.deliver(exc)

    def _send(self, out: RequestOutput) -> None:
        deliver = self._delivery.get(out.request_id)
        if deliver is not None:
            deliver(out)
            if out.finished:
                del self._delivery[out.request_id]
