"""Overlap scheduling: the engine thread schedules and builds step N+1 while step N runs.

What it is for: the pieces `EngineCore.step` uses when `EngineConfig.overlap` is on
(`overlap_enabled` resolves `auto`): a one-thread worker (`OverlapWorker`) that runs
each step's forward and sampling (`run_step`) in order, and the record of a step in
flight (`InFlightStep`). One call of `EngineCore.step` then:

1. schedules step N+1 while step N runs: the scheduler counted N's tokens as computed
   and N's sampled tokens as pending (`Scheduler.commit_ahead`), so a request decoding
   in N gets a one-token chunk in N+1 whose input token is a placeholder;
2. builds N+1's batch on the host (`PyTorchExecutor.prepare`) and submits it: the
   worker fills each placeholder from N's sampled-token tensor (an index_select on the
   device, never through the host; `ForwardBatch.fill_placeholders`) and runs the forward;
3. waits for N's tokens and updates N (append, stop checks, output records); then N+1's
   sampling may start (`InFlightStep.updated`, the barrier below).

The barrier makes sampling step N+1 see exactly the host state a synchronous step sees:
every token of step N appended, every request that N finished marked finished (its
row is left out of the sampling, so the shared random stream, grammar matchers and seeded
generators advance as without overlap). Penalties, min_tokens, bad words, logprobs and
seeded sampling therefore run overlapped. A request that finished at step N (stop token,
max_tokens, abort) and was already scheduled into N+1 gets that extra token dropped
(`update_from_output` skips finished requests) and its KV blocks are freed when it
finishes: the forward of N+1 still writes its one slot, but every later step that could
reuse the block runs after it (one worker, in order), and a block holding a slot not yet
computed is never in the prefix cache. A request whose pending tokens reach max_tokens is
not scheduled again.

Steps that fall back to synchronous (the previous step is finished and updated first,
and this one runs on the engine thread):
* any scheduled request with structured output (a grammar matcher is a native object
  that the engine thread creates for newly admitted requests; it is only used on the
  engine thread);
* overlap off.
Scheduling is otherwise unchanged, so the batches differ slightly from a synchronous run
(a finishing request holds its slot one step longer); greedy tokens are the same
(tests/runtime/core/test_overlap.py).

`auto`: on for CUDA (the forward is launched asynchronously; the worker waits in its sync
while the engine thread works), off on CPU, where the forward is synchronous and shares the
GIL and the cores with the engine thread. Measured (benchmarks/host_overhead.py --overlap
off,on, batch 16, token ids only, alternating runs on the shared 2-core machine at load
12-16): tiny-qwen2 (per-op Python, GIL-bound) median 0.86x with overlap (6 of 8 pairs
slower); small-qwen2 median 1.4x, but its host work is about 2 % of its step, so that gain
is the extra runnable thread's share of a loaded machine, not overlap; a quiet rerun decides.
Not for: the step's contents (scheduler, executor, sampler) or the engine's outputs.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from runtime.core.request import Request
from runtime.core.scheduler import SchedulerOutput
from runtime.executor.executor import PyTorchExecutor
from runtime.executor.forward_batch import ForwardBatch
from runtime.executor.sampler import Sampler, SamplerOutput, TokenLogprobs


def overlap_enabled(mode: str, device: torch.device) -> bool:
    """`EngineConfig.overlap` resolved for the device: auto is on for CUDA and off on CPU (module docstring)."""
    if mode != "auto":
        return mode == "on"
    return device.type == "cuda"


def needs_synchronous_step(plan: SchedulerOutput) -> bool:
    """Whether the step must run on the engine thread after the previous one is updated (module docstring)."""
    return any(item.request.grammar is not None for item in plan.scheduled)


@dataclass(frozen=True, slots=True)
class StepResult:
    sampled: SamplerOutput          # one entry per sampling row (rows of finished requests: token 0, no logprobs)
    token_ids: torch.Tensor         # the same tokens as int64 on the model's device, for the next placeholders


@dataclass(slots=True)
class InFlightStep:
    """A step submitted to the worker whose tokens the engine has not yet taken."""

    plan: SchedulerOutput
    result: Future[StepResult]
    # set once the engine thread has updated this step (tokens appended, stop checks done): the next
    # step's sampling waits for it
    updated: threading.Event = field(default_factory=threading.Event)

    @property
    def sampling_rows(self) -> dict[str, int]:
        """Request id -> row of this step's sampled tokens (the next step's placeholder sources)."""
        return {request.request_id: row for row, request in enumerate(self.plan.sampling_requests)}


class OverlapWorker:
    """One thread that runs the steps' forward and sampling, in submission order."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trtserve-step")

    def submit(self, executor: PyTorchExecutor, sampler: Sampler, batch: ForwardBatch, plan: SchedulerOutput,
               previous: InFlightStep | None) -> InFlightStep:
        barrier = previous.updated if previous is not None else updated_event()
        future = self._pool.submit(run_step, executor, sampler, batch, plan.sampling_requests,
                                   previous.result if previous is not None else None, barrier)
        return InFlightStep(plan, future)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def updated_event() -> threading.Event:
    """A barrier already passed: for a step with no step before it still to update."""
    event = threading.Event()
    event.set()
    return event


def run_step(executor: PyTorchExecutor, sampler: Sampler, batch: ForwardBatch, requests: list[Request],
             previous: Future[StepResult] | None, barrier: threading.Event) -> StepResult:
    """Forward and sample one step: placeholders from `previous`, sampling after `barrier`.

    Rows of requests finished by the time of sampling are left out (token 0, no logprobs).
    """
    previous_token_ids = None
    if previous is not None and batch.placeholder_rows is not None:
        try:
            previous_token_ids = previous.result().token_ids
        except Exception:  # that step failed and its requests were failed: their rows here are dropped
            previous_token_ids = None
    logits = executor.run(batch, previous_token_ids)
    barrier.wait()
    live = [row for row, request in enumerate(requests) if not request.status.finished]
    if len(live) == len(requests):
        sampled = sampler.sample(logits, requests)
    else:
        sampled = _sample_rows(sampler, logits, requests, live)
    token_ids = torch.tensor(sampled.sampled_token_ids, dtype=torch.int64, device=logits.device)
    return StepResult(sampled, token_ids)


def _sample_rows(sampler: Sampler, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> SamplerOutput:
    token_ids = [0] * len(requests)
    logprobs: list[TokenLogprobs | None] = [None] * len(requests)
    if rows:
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        part = sampler.sample(logits.index_select(0, index), [requests[row] for row in rows])
        for j, row in enumerate(rows):
            token_ids[row] = part.sampled_token_ids[j]
            logprobs[row] = part.logprobs[j]
    return SamplerOutput(token_ids, logprobs)
