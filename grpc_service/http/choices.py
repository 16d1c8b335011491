"""Running the choices of one OpenAI request (prompts x n samples) as engine requests, merged in one stream.

What it is for: `Job` (one choice: its prompt and SamplingParams) and
`run_choices(model, jobs)`, an async iterator of `(choice index, RequestOutput)`.
The samples of one prompt share its KV blocks through the prefix cache: the
first sample starts alone, the others start once it has produced its first
token (its full prompt blocks are then computed and cached), so they prefill
only the last partial block. Leaving the iterator (client gone, error) aborts
every engine request still running within one step; an engine error or a
refusal of any choice ends the whole request with that error.
Not for: the response format (app.py / responses.py).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from grpc_service.engine_host import ServedModel
from grpc_service.errors import RequestFailed
from grpc_service.http.prompts import Prompt
from runtime.outputs import RequestOutput
from runtime.sampling_params import SEED_LIMIT, SamplingParams

API_LABEL = "openai"


@dataclass(frozen=True, slots=True)
class Job:
    index: int                    # the choice index
    prompt_index: int
    prompt: Prompt
    params: SamplingParams
    leader: int | None            # index of the job whose first token this one waits for


def make_jobs(prompts: list[Prompt], params: list[SamplingParams], n: int) -> list[Job]:
    """n samples per prompt; sample k > 0 of a seeded request uses seed + k (mod 2**64)."""
    jobs = []
    for p, (prompt, base) in enumerate(zip(prompts, params)):
        for k in range(n):
            sample = base if k == 0 or base.seed is None else replace(base, seed=(base.seed + k) % SEED_LIMIT)
            jobs.append(Job(p * n + k, p, prompt, sample, None if k == 0 else p * n))
    return jobs


async def run_choices(model: ServedModel, jobs: list[Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
    items: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
    started = {job.index: asyncio.Event() for job in jobs}

    async def run(job: Job) -> None:
        try:
            if job.leader is not None:
                await started[job.leader].wait()
            stream = model.generate(job.prompt.token_ids, job.params, API_LABEL, multimodal=job.prompt.multimodal)
            async with contextlib.aclosing(stream) as outputs:
                async for out in outputs:
                    started[job.index].set()
                    items.put_nowait((job.index, out))
        except Exception as exc:          # a refusal or engine failure ends the whole request
            items.put_nowait(exc)
        finally:
            started[job.index].set()

    tasks = [asyncio.create_task(run(job)) for job in jobs]
    remaining = len(jobs)
    try:
        while remaining:
            item = await items.get()
            if isinstance(item, BaseException):
                raise item
            if item[1].finish_reason == "error":
                raise RequestFailed(item[1].error or "the engine failed the request")
            if item[1].finished:
                remaining -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
