"""The server's asyncio event loop: uvloop's where installed (the default), or the standard one.

What it is for: `run(coroutine, choice)`, how trtserve-serve runs `Server.run()`. gRPC's asyncio server wakes
the loop once per completed operation, so a streamed token costs the loop at least one iteration of its own
(gRPC's poller writes one byte per completion, the loop reads it and runs the completion's callback) besides
the request's coroutine steps. uvloop (libuv, the loop written in Cython) runs those iterations and callbacks
without the standard loop's Python-level selector, handle and scheduling code: served tiny-qwen2 at c=16 the
server process's CPU per streamed token dropped by about a quarter. `choice`: "auto" (uvloop when it can be
imported, else the standard loop), "uvloop" (an error naming the field when it is missing), "asyncio".
Not for: the engine's threads or the core process (no event loop there), or clients (bench/ keeps asyncio's).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from grpc_service.config import ServerConfigError

_T = TypeVar("_T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str) -> LoopFactory | None:
    """The loop constructor for `choice` (None: asyncio's default loop)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ServerConfigError("event_loop", "uvloop is not installed (pip install uvloop), or choose "
                                                  "'asyncio'") from None
        return None
    return uvloop.new_event_loop


def run(coroutine: Coroutine[Any, Any, _T], choice: str) -> _T:
    """`asyncio.run(coroutine)` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(coroutine)
