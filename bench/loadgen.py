"""Closed-loop load: c clients, each keeping exactly one request in flight until the sessions run out.

What it is for: `run_level` drives a backend at one concurrency level and fills
a caller-owned `LevelRun` as records arrive, so that on Ctrl-C (the task is
cancelled; in-flight RPCs are cancelled with it) the caller still holds what
was measured. A multi-turn session's next turn resends the history: the
previous prompt, the server's answer, then the new user text.
Not for: building prompts (workloads.py) or computing metrics (summary.py).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from bench.backends import BenchRequest, RequestRecord
from bench.workloads import Session


class Backend(Protocol):
    protocol: str

    async def send(self, request: BenchRequest) -> RequestRecord: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class LevelRun:
    concurrency: int
    num_requests: int                   # planned
    records: list[RequestRecord] = field(default_factory=list)
    partial: bool = False

    @property
    def start_s(self) -> float:
        return min((r.start_s for r in self.records), default=0.0)

    @property
    def end_s(self) -> float:
        return max((r.end_s for r in self.records), default=0.0)


def next_request(history: tuple[BenchRequest, RequestRecord] | None, turn: BenchRequest) -> BenchRequest:
    """The turn alone, or the history (previous prompt + its answer) followed by the turn."""
    if history is None:
        return turn
    previous, answer = history
    return BenchRequest(previous.text + answer.output_text + turn.text,
                        previous.token_ids + tuple(answer.output_ids) + turn.token_ids,
                        turn.output_len, previous.images + turn.images)


async def run_level(backend: Backend, sessions: list[Session], run: LevelRun,
                    on_record: Callable[[RequestRecord], None] | None = None) -> LevelRun:
    """Run every session with `run.concurrency` clients; cancellation cancels the clients' RPCs."""
    pending: Iterator[Session] = iter(sessions)

    async def client() -> None:
        task = asyncio.current_task()
        for session in pending:          # one event loop: next() is never interleaved
            history: tuple[BenchRequest, RequestRecord] | None = None
            for turn in session.turns:
                request = next_request(history, turn)
                record = await backend.send(request)
                run.records.append(record)
                if on_record is not None:
                    on_record(record)
                if task is not None and task.cancelling():
                    # the cancellation reached an RPC that ended as a CANCELLED record instead of raising:
                    # stop here, or this client would go on through every remaining session
                    raise asyncio.CancelledError
                if not record.ok:
                    break                # later turns would resend an answer that never came
                history = (request, record)

    clients = [asyncio.create_task(client()) for _ in range(run.concurrency)]
    try:
        await asyncio.gather(*clients)
    except BaseException:
        run.partial = True
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        raise
    return run
