"""The scheduler under overlap (Scheduler.commit_ahead): random workloads on test_scheduler.py's fake model.

The loop is the overlapped EngineCore.step without tensors: schedule step N+1 and count it as
computed (commit_ahead) before step N is updated, then update N. The fake model runs a step when
it is launched (the worker's order), writing each scheduled position's value into the blocks it was
given; a placeholder position (the token the step in flight samples) takes the previous step's
sampled token, never the host's. With adds, aborts while a step is in flight, preemption, both
capacity policies, chunked prefill and prefix caching, every request still gets the tokens it gets
alone (a wrong block, a wrong prefix hit or a wrong placeholder changes them), a finished request's
extra token is dropped, the block bookkeeping stays consistent after every step, and every block is
free at the end.
"""
from __future__ import annotations

from hypothesis import given, settings

from runtime.core.request import Request, RequestStatus
from runtime.core.scheduler import SchedulerOutput
from tests.runtime.core.test_scheduler import (Engine, RequestSpec, check_drained_with_solo_outputs, engine_settings,
                                               make_engine, next_token, operations, token_value)


class AheadLoop:
    """EngineCore.step with overlap, over the fake engine: launch N+1, then update N."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.in_flight: tuple[SchedulerOutput, dict[str, int]] | None = None

    def step(self) -> None:
        scheduler = self.engine.scheduler
        plan = scheduler.schedule()
        previous, self.in_flight = self.in_flight, None
        if not plan.is_empty:
            check_ahead(plan)
            self.in_flight = (scheduler.commit_ahead(plan), self.launch(plan, previous[1] if previous else {}))
        if previous is not None:
            for request in scheduler.update_from_output(*previous):
                if request.num_output_tokens >= request.sampling_params.max_tokens:
                    scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
        self.engine.kv.check_invariants()

    def launch(self, plan: SchedulerOutput, previous_sampled: dict[str, int]) -> dict[str, int]:
        model = self.engine.model
        for item in plan.scheduled:
            start, request = item.num_computed_tokens, item.request
            for position in range(start, start + item.num_new_tokens):
                if position >= start + item.num_new_tokens - item.num_placeholder_tokens:
                    value = previous_sampled[request.request_id]       # the placeholder
                else:
                    value = token_value(request, position)
                model.slots[model._slot(item.block_ids, position)] = value
        return {item.request.request_id: next_token([model.slots[model._slot(item.block_ids, p)]
                                                     for p in range(item.num_known_tokens)])
                for item in plan.scheduled if item.samples}

    def drain(self) -> None:
        for _ in range(2000):
            if not (self.engine.scheduler.has_unfinished or self.in_flight):
                return
            self.step()
        raise AssertionError("requests did not finish")


def check_ahead(plan: SchedulerOutput) -> None:
    for item in plan.scheduled:
        request = item.request
        assert request.status is RequestStatus.RUNNING and item.num_new_tokens >= 1
        assert item.num_computed_tokens + item.num_new_tokens <= item.num_known_tokens
        assert item.num_known_tokens == request.num_tokens + request.num_pending_tokens
        assert item.num_placeholder_tokens in (0, 1)
        if item.num_placeholder_tokens:       # only the decode of the token in flight, never past max_tokens
            assert item.num_new_tokens == 1 and item.samples
            assert request.num_output_tokens + 1 < request.sampling_params.max_tokens


@settings(max_examples=60, deadline=None)
@given(ops=operations, options=engine_settings())
def test_random_workloads_with_overlap_get_solo_outputs_and_free_blocks(
    ops: list[tuple[str, object]], options: dict[str, object],
) -> None:
    engine = make_engine(**options)  # type: ignore[arg-type]
    loop, kv, scheduler = AheadLoop(engine), engine.kv, engine.scheduler
    admitted: list[Request] = []
    for index, (kind, arg) in enumerate(ops):
        if isinstance(arg, RequestSpec):
            request = arg.build(f"r{index}")
            num_total = len(arg.prompt) + arg.max_tokens
            if arg.prompt and num_total <= scheduler.config.max_seq_len and \
                    kv.num_blocks_needed(num_total) <= kv.total_num_blocks:
                engine.add(request)
                admitted.append(request)
        elif kind == "step":
            for _ in range(int(arg)):  # type: ignore[call-overload]
                loop.step()
        elif admitted:                          # an abort, possibly of a request in the step in flight
            victim = admitted[int(arg) % len(admitted)]  # type: ignore[call-overload]
            scheduler.finish_request(victim.request_id, RequestStatus.FINISHED_ABORTED)
            kv.check_invariants()
    loop.drain()
    check_drained_with_solo_outputs(engine, admitted)
