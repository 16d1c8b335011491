"""The server's event loop choice (grpc_service/event_loop.py, ServerConfig.event_loop).

"asyncio" gives the standard loop, "auto" uvloop's (a core dependency off Windows) and `run` runs a coroutine
on it; an unknown choice is refused naming the field. A served check (the started server logs uvloop's loop)
is in tests/grpc_service/test_engine_process.py.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from grpc_service.config import ServerConfig, ServerConfigError
from grpc_service.event_loop import loop_factory, run

uvloop = pytest.importorskip("uvloop")


def test_choices_give_their_loops_and_a_bad_one_names_the_field() -> None:
    assert loop_factory("asyncio") is None
    assert loop_factory("auto") is uvloop.new_event_loop and loop_factory("uvloop") is uvloop.new_event_loop

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert issubclass(run(loop_type(), "auto"), uvloop.Loop)
    assert not issubclass(run(loop_type(), "asyncio"), uvloop.Loop)
    with pytest.raises(ServerConfigError, match="event_loop") as info:
        ServerConfig(engine_dirs=(Path("engine"),), event_loop="tokio").validate()
    assert info.value.field == "event_loop"
