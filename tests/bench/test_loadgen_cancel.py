"""Cancelling a level (Ctrl-C) stops every client, also when the backend's RPC turns the cancellation into a
CANCELLED record instead of raising it (seen with grpc.aio: the interrupted benchmark then went on through all
of its remaining requests and never exited)."""
from __future__ import annotations

import asyncio
import time

from bench.backends import BenchRequest, RequestRecord
from bench.loadgen import LevelRun, run_level
from bench.workloads import Session


class SwallowingBackend:
    """Each request takes 10 ms; a cancellation during one ends it as an error record, like a CANCELLED RPC."""

    protocol = "fake"

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, request: BenchRequest) -> RequestRecord:
        self.sent += 1
        record = RequestRecord(time.perf_counter())
        try:
            await asyncio.sleep(0.01)
            record.output_tokens = request.output_len
        except asyncio.CancelledError:
            record.error = "CANCELLED: the call was cancelled"
        record.end_s = time.perf_counter()
        return record

    async def close(self) -> None:
        return None


def test_cancelled_level_stops_even_when_the_rpc_swallows_the_cancellation() -> None:
    backend = SwallowingBackend()
    sessions = [Session((BenchRequest("x", (1,), 4),)) for _ in range(2000)]
    run = LevelRun(concurrency=4, num_requests=len(sessions))

    async def main() -> None:
        level = asyncio.create_task(run_level(backend, sessions, run))
        await asyncio.sleep(0.1)
        level.cancel()
        try:
            await asyncio.wait_for(level, timeout=5)
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    assert run.partial
    # about 10 requests per client were done in 0.1 s; without the stop every client went on through all 2000
    assert backend.sent < 200, backend.sent
    assert any(not record.ok for record in run.records)
