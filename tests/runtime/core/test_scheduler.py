"""Scheduler: token budget, chunked prefill, FCFS, capacity policies, prefix cache, abort.

The engine loop is simulated with a fake model that keeps a paged "KV cache"
of token values (block id, slot) -> value, writes the scheduled positions into
the blocks it was given, and reads the whole history back from those blocks to
pick the next token. A wrong block table or a wrong prefix hit therefore shows
up as a wrong output token. Requests reach the scheduler through the engine's
door (runtime/core/admission.py), as in EngineCore. Hypothesis property tests
are at the end.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from runtime.core.admission import AdmissionLimits, RequestRejectedError, check_request
from runtime.core.kv_cache import KVCacheManager
from runtime.core.request import EngineRequest, MultimodalSpan, Request, RequestStatus
from runtime.core.scheduler import Scheduler, SchedulerConfig, SchedulerConfigError, SchedulerOutput
from tests.helpers.requests import make_request


# ---------------------------------------------------------------- fake engine

def token_value(request: Request, position: int) -> int:
    """What the fake model stores in the KV cache: the token id, plus its image's content."""
    value = request.all_token_ids[position]
    for span in request.mm_spans:
        if span.offset <= position < span.offset + span.length:
            value += zlib.crc32(span.content_hash.encode()) % 1000
    return value


def next_token(values: list[int]) -> int:
    return (sum(values) * 31 + len(values)) % 1000


def expected_output(request: Request) -> list[int]:
    """The output the request gets when it runs alone (the fake model is deterministic)."""
    alone = Request("alone", list(request.prompt_token_ids), request.sampling_params,
                    multimodal=request.multimodal)
    for _ in range(request.sampling_params.max_tokens):
        alone.append_output_token(next_token([token_value(alone, p) for p in range(alone.num_tokens)]))
    return alone.output_token_ids


class FakeModel:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.slots: dict[tuple[int, int], int] = {}

    def _slot(self, block_ids: list[int], position: int) -> tuple[int, int]:
        return block_ids[position // self.block_size], position % self.block_size

    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        for item in output.scheduled:                      # write this step's K/V first
            start = item.num_computed_tokens
            for position in range(start, start + item.num_new_tokens):
                self.slots[self._slot(item.block_ids, position)] = token_value(item.request, position)
        sampled: dict[str, int] = {}
        for item in output.scheduled:                      # then attend over the cache
            if item.samples:
                values = [self.slots[self._slot(item.block_ids, p)] for p in range(item.num_known_tokens)]
                sampled[item.request.request_id] = next_token(values)
        return sampled


@dataclass(slots=True)
class Engine:
    scheduler: Scheduler
    model: FakeModel
    limits: AdmissionLimits

    @property
    def kv(self) -> KVCacheManager:
        return self.scheduler.kv_cache

    def add(self, request: Request) -> None:
        """The engine's door for the request's tokens and parameters, then the queue (as EngineCore)."""
        check_request(EngineRequest(request.request_id, request.prompt_token_ids, request.sampling_params),
                      self.limits, self.scheduler.has_request)
        self.scheduler.add_request(request)

    def step(self) -> SchedulerOutput:
        output = self.scheduler.schedule()
        check_output(self.scheduler, output)
        sampled = self.model.execute(output)
        for request in self.scheduler.update_from_output(output, sampled):
            if request.num_output_tokens >= request.sampling_params.max_tokens:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
        self.kv.check_invariants()
        return output

    def run(self, max_steps: int = 1000) -> list[SchedulerOutput]:
        outputs: list[SchedulerOutput] = []
        while self.scheduler.has_unfinished:
            assert len(outputs) < max_steps, "requests did not finish"
            outputs.append(self.step())
        assert self.kv.num_used_blocks == 0
        return outputs


def check_output(scheduler: Scheduler, output: SchedulerOutput) -> None:
    config, kv = scheduler.config, scheduler.kv_cache
    ids = [item.request.request_id for item in output.scheduled]
    assert len(ids) == len(set(ids)), "a request was scheduled twice"
    assert len(ids) <= config.max_batch_size
    assert output.num_scheduled_tokens == sum(item.num_new_tokens for item in output.scheduled)
    assert output.num_scheduled_tokens <= config.max_num_tokens
    assert scheduler.num_running <= config.max_batch_size
    if config.capacity_policy == "guaranteed_no_evict":
        assert output.preempted_request_ids == []
    for item in output.scheduled:
        end = item.num_computed_tokens + item.num_new_tokens
        assert item.num_new_tokens >= 1 and end <= item.request.num_tokens
        assert len(item.block_ids) >= kv.num_blocks_needed(end)
        assert item.request.status is RequestStatus.RUNNING


def make_engine(
    *, num_blocks: int = 64, block_size: int = 4, max_batch_size: int = 8, max_num_tokens: int = 64,
    max_seq_len: int = 64, policy: str = "max_utilization", chunked: bool = True,
    prefix_caching: bool = True,
) -> Engine:
    config = SchedulerConfig(max_batch_size, max_num_tokens, max_seq_len, policy, chunked)
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    limits = AdmissionLimits(vocab_size=1000, max_input_len=max_seq_len, max_seq_len=max_seq_len,
                             num_kv_blocks=num_blocks, tokens_per_block=block_size)
    return Engine(Scheduler(config, kv), FakeModel(block_size), limits)


def scheduled_tokens(output: SchedulerOutput) -> dict[str, int]:
    return {item.request.request_id: item.num_new_tokens for item in output.scheduled}


# ------------------------------------------------------------------- budget

def test_token_budget_and_chunked_prefill() -> None:
    engine = make_engine(max_num_tokens=8)
    long = make_request("long", list(range(20)), max_tokens=2)
    engine.add(long)
    first, second, third = engine.step(), engine.step(), engine.step()
    assert [scheduled_tokens(o) for o in (first, second, third)] == [{"long": 8}, {"long": 8}, {"long": 4}]
    assert [o.scheduled[0].samples for o in (first, second, third)] == [False, False, True]
    assert long.num_output_tokens == 1 and long.num_computed_tokens == 20
    engine.run()
    assert long.output_token_ids == expected_output(long)


def test_decode_requests_get_one_token_each_and_budget_is_shared() -> None:
    engine = make_engine(max_num_tokens=10)
    requests = [make_request(f"r{i}", [i + 1] * 6, max_tokens=5) for i in range(3)]
    for request in requests:
        engine.add(request)
    assert scheduled_tokens(engine.step()) == {"r0": 6, "r1": 4}             # r1 chunked
    assert scheduled_tokens(engine.step()) == {"r0": 1, "r1": 2, "r2": 6}
    assert scheduled_tokens(engine.step()) == {"r0": 1, "r1": 1, "r2": 1}
    engine.run()
    for request in requests:
        assert request.output_token_ids == expected_output(request)


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget() -> None:
    engine = make_engine(max_num_tokens=16, max_seq_len=16, chunked=False)
    first, second = make_request("a", [1] * 10, 3), make_request("b", [2] * 10, 3)
    engine.add(first)
    engine.add(second)
    assert scheduled_tokens(engine.step()) == {"a": 10}
    assert scheduled_tokens(engine.step()) == {"a": 1, "b": 10}
    engine.run()
    assert second.output_token_ids == expected_output(second)


def test_batch_size_limits_running_requests_fcfs() -> None:
    engine = make_engine(max_batch_size=2)
    requests = [make_request(f"r{i}", [i] * 3, max_tokens=2 + i) for i in range(3)]
    for request in requests:
        engine.add(request)
    assert list(scheduled_tokens(engine.step())) == ["r0", "r1"]
    assert engine.scheduler.num_waiting == 1
    outputs = engine.run()
    first_r2 = next(o for o in outputs if "r2" in scheduled_tokens(o))
    assert "r0" not in scheduled_tokens(first_r2)                     # admitted once r0 finished
    assert [r.output_token_ids for r in requests] == [expected_output(r) for r in requests]


def test_fcfs_head_that_does_not_fit_blocks_later_requests() -> None:
    engine = make_engine(num_blocks=6, block_size=4, max_seq_len=24)
    holder = make_request("holder", [1] * 12, max_tokens=4)           # 3 blocks, grows to 4
    big = make_request("big", [2] * 16, max_tokens=4)                 # needs 4 blocks now
    small = make_request("small", [3] * 3, max_tokens=2)              # would fit in 1
    for request in (holder, big, small):
        engine.add(request)
    assert scheduled_tokens(engine.step()) == {"holder": 12}
    assert engine.scheduler.num_waiting == 2                          # small not ahead of big
    engine.run()
    for request in (holder, big, small):
        assert request.output_token_ids == expected_output(request)


# ------------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, field_name", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_num_tokens": -1}, "max_num_tokens"),
    ({"max_seq_len": 0}, "max_seq_len"),
    ({"capacity_policy": "fastest"}, "capacity_policy"),
    ({"max_num_tokens": 8, "enable_chunked_prefill": False}, "max_num_tokens"),
])
def test_config_validation_names_the_field(kwargs: dict[str, object], field_name: str) -> None:
    values: dict[str, object] = {"max_batch_size": 4, "max_num_tokens": 64, "max_seq_len": 64,
                                 "capacity_policy": "max_utilization"}
    values.update(kwargs)
    with pytest.raises(SchedulerConfigError) as info:
        SchedulerConfig(**values)  # type: ignore[arg-type]
    assert info.value.field == field_name


# ------------------------------------------------------------ capacity policy

def test_max_utilization_preempts_the_newest_requeues_it_first_and_it_completes() -> None:
    engine = make_engine(num_blocks=6, block_size=4, max_seq_len=24, max_batch_size=2)
    old, new = make_request("old", [1] * 8, max_tokens=12), make_request("new", [2] * 8, max_tokens=12)
    late = make_request("late", [3] * 4, max_tokens=2)                # waits: batch is full
    for request in (old, new, late):
        engine.add(request)
    num_preempted_steps = 0
    while engine.scheduler.has_unfinished:
        output = engine.step()
        if output.preempted_request_ids:
            num_preempted_steps += 1
            assert output.preempted_request_ids == ["new"] and new.status is RequestStatus.PREEMPTED
            assert new.num_computed_tokens == 0 and engine.kv.block_ids("new") == []
            assert engine.scheduler.waiting_request_ids[0] == "new"  # front of the queue
        assert num_preempted_steps < 50
    assert num_preempted_steps > 0 and new.num_preemptions == num_preempted_steps
    assert old.num_preemptions == 0 and engine.kv.num_used_blocks == 0
    for request in (old, new, late):                                  # recompute keeps outputs
        assert request.output_token_ids == expected_output(request)


def test_guaranteed_no_evict_never_preempts() -> None:
    engine = make_engine(num_blocks=6, block_size=4, max_seq_len=24, policy="guaranteed_no_evict")
    old, new = make_request("old", [1] * 8, max_tokens=12), make_request("new", [2] * 8, max_tokens=12)
    engine.add(old)
    engine.add(new)
    assert scheduled_tokens(engine.step()) == {"old": 8}              # new's worst case does not fit
    outputs = engine.run()
    assert all(not o.preempted_request_ids for o in outputs)
    assert old.num_preemptions == new.num_preemptions == 0
    assert new.output_token_ids == expected_output(new)


# -------------------------------------------------------------- prefix cache

def test_prefix_hit_skips_cached_tokens_and_keeps_outputs() -> None:
    engine = make_engine(block_size=4)
    first = make_request("a", list(range(14)), max_tokens=3)
    engine.add(first)
    engine.run()
    second = make_request("b", list(range(12)) + [40, 41], max_tokens=3)
    engine.add(second)
    output = engine.step()
    assert output.scheduled[0].num_computed_tokens == 12 and output.scheduled[0].num_new_tokens == 2
    assert second.num_cached_tokens == 12
    engine.run()
    assert second.output_token_ids == expected_output(second)


def test_only_computed_blocks_are_cached() -> None:
    engine = make_engine(block_size=4)
    first = make_request("a", [1, 2, 3, 4, 5, 6, 7], max_tokens=3)
    engine.add(first)
    engine.step()                                      # computes 7 tokens, samples the 8th
    assert first.num_tokens == 8 and engine.kv.num_cached_blocks == 1
    second = make_request("b", first.all_token_ids + [9], max_tokens=2)
    engine.add(second)
    output = engine.step()                             # block 1's last slot is not written yet
    assert {i.request.request_id: i.num_computed_tokens for i in output.scheduled} == {"a": 7, "b": 4}
    engine.run()
    assert second.output_token_ids == expected_output(second)


def test_same_tokens_different_images_give_their_own_outputs() -> None:
    engine = make_engine(block_size=4)
    prompt = [7, 7, 0, 0, 0, 0, 0, 0, 9]
    spans = {name: (MultimodalSpan(2, 6, name),) for name in ("cat", "dog")}
    requests = [make_request(name, prompt, max_tokens=3, mm_spans=spans[name]) for name in spans]
    for request in requests:
        engine.add(request)
        engine.run()
    assert requests[1].num_cached_tokens == 0
    assert requests[0].output_token_ids != requests[1].output_token_ids
    for request in requests:
        assert request.output_token_ids == expected_output(request)


# -------------------------------------------------------------- finish / abort

def test_abort_waiting_running_and_unknown_requests() -> None:
    engine = make_engine(max_batch_size=1)
    running, waiting = make_request("run", [1] * 9), make_request("wait", [2] * 5)
    engine.add(running)
    engine.add(waiting)
    engine.step()
    assert engine.kv.num_used_blocks == 3
    assert engine.scheduler.finish_request("wait", RequestStatus.FINISHED_ABORTED)
    assert engine.scheduler.finish_request("run", RequestStatus.FINISHED_ABORTED)
    assert running.status is RequestStatus.FINISHED_ABORTED and waiting.status is RequestStatus.FINISHED_ABORTED
    assert engine.kv.num_used_blocks == 0 and not engine.scheduler.has_unfinished
    assert not engine.scheduler.finish_request("run", RequestStatus.FINISHED_ABORTED)
    assert not engine.scheduler.finish_request("nobody", RequestStatus.FINISHED_ABORTED)
    assert engine.scheduler.schedule().finished_request_ids == ["wait", "run"]
    with pytest.raises(ValueError, match="status"):
        engine.scheduler.finish_request("x", RequestStatus.RUNNING)


def test_abort_between_schedule_and_update_is_skipped() -> None:
    engine = make_engine()
    request = make_request("a", [1, 2, 3])
    engine.add(request)
    output = engine.scheduler.schedule()
    sampled = engine.model.execute(output)
    engine.scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert engine.scheduler.update_from_output(output, sampled) == []
    assert request.num_output_tokens == 0 and engine.kv.num_used_blocks == 0


def test_missing_sampled_token_raises_and_changes_nothing() -> None:
    engine = make_engine()
    request = make_request("a", [1, 2, 3])
    engine.add(request)
    output = engine.scheduler.schedule()
    with pytest.raises(ValueError, match="sampled_token_ids"):
        engine.scheduler.update_from_output(output, {})
    assert request.num_computed_tokens == 0
    engine.scheduler.finish_request("a", RequestStatus.FINISHED_ERROR)
    assert engine.kv.num_used_blocks == 0


# ---------------------------------------------------------- property tests

BASE_PROMPTS = ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5])


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: list[int]
    max_tokens: int
    salt: str | None
    image: str | None

    def build(self, request_id: str) -> Request:
        spans = (MultimodalSpan(1, 3, self.image),) if self.image and len(self.prompt) > 4 else ()
        return make_request(request_id, self.prompt, self.max_tokens, salt=self.salt, mm_spans=spans)


request_specs = st.builds(
    lambda base, prefix_len, suffix, max_tokens, salt, image: RequestSpec(
        BASE_PROMPTS[base][:prefix_len] + suffix, max_tokens, salt, image),
    st.integers(0, 1), st.sampled_from([0, 3, 4, 6, 8, 12]), st.lists(st.integers(0, 9), max_size=4),
    st.integers(1, 10), st.sampled_from([None, None, None, "s"]),
    st.sampled_from([None, None, "img1", "img2"]),
)
operations = st.lists(st.one_of(
    st.tuples(st.just("add"), request_specs),
    st.tuples(st.just("add"), request_specs),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
), min_size=4, max_size=24)


@st.composite
def engine_settings(draw: st.DrawFn) -> dict[str, object]:
    """Pools that usually hold any one request but not all of them (so preemption happens)."""
    block_size = draw(st.integers(1, 4))
    max_seq_len = draw(st.integers(16, 28))
    num_blocks = -(-draw(st.integers(12, 32)) // block_size)
    chunked = draw(st.booleans())
    max_num_tokens = draw(st.integers(1, 16)) if chunked else max_seq_len + draw(st.integers(0, 4))
    return {"block_size": block_size, "max_seq_len": max_seq_len, "num_blocks": num_blocks,
            "chunked": chunked, "max_num_tokens": max_num_tokens,
            "max_batch_size": draw(st.integers(1, 4)), "prefix_caching": draw(st.sampled_from([True, True, False])),
            "policy": draw(st.sampled_from(["max_utilization", "guaranteed_no_evict"]))}


def run_workload(ops: list[tuple[str, object]], options: dict[str, object]) -> Engine:
    """Apply add / step / abort operations, drain the engine, check every outcome."""
    engine = make_engine(**options)  # type: ignore[arg-type]
    kv, scheduler = engine.kv, engine.scheduler
    admitted: list[Request] = []
    for index, (kind, arg) in enumerate(ops):
        if isinstance(arg, RequestSpec):
            request = arg.build(f"r{index}")
            num_total = len(arg.prompt) + arg.max_tokens
            if not arg.prompt or num_total > scheduler.config.max_seq_len or \
                    kv.num_blocks_needed(num_total) > kv.total_num_blocks:
                with pytest.raises(RequestRejectedError):
                    engine.add(request)
                assert not scheduler.has_request(request.request_id)
                continue
            engine.add(request)
            admitted.append(request)
        elif kind == "step":
            for _ in range(int(arg)):  # type: ignore[call-overload]
                engine.step()
        elif admitted:
            victim = admitted[int(arg) % len(admitted)]  # type: ignore[call-overload]
            scheduler.finish_request(victim.request_id, RequestStatus.FINISHED_ABORTED)
            kv.check_invariants()
    outputs = engine.run(max_steps=2000)
    event(f"{options['policy']} preempted: {any(o.preempted_request_ids for o in outputs)}")
    event(f"prefix hit: {kv.num_hit_tokens > 0}")
    check_drained_with_solo_outputs(engine, admitted)
    return engine


def check_drained_with_solo_outputs(engine: Engine, admitted: list[Request]) -> None:
    """After a drained workload: nothing queued, every request's tokens are those it gets alone (an aborted
    one's a prefix of them), the block bookkeeping is consistent and every block is free."""
    kv, scheduler = engine.kv, engine.scheduler
    assert scheduler.num_running == scheduler.num_waiting == 0
    for request in admitted:
        expected = expected_output(request)
        if request.status is RequestStatus.FINISHED_ABORTED:
            assert request.output_token_ids == expected[:request.num_output_tokens]
        else:
            assert request.status is RequestStatus.FINISHED_LENGTH
            assert request.output_token_ids == expected
    kv.check_invariants()
    assert kv.num_used_blocks == 0


@settings(max_examples=60, deadline=None)
@given(ops=operations, options=engine_settings())
def test_random_workloads_finish_with_solo_outputs_and_free_blocks(
    ops: list[tuple[str, object]], options: dict[str, object],
) -> None:
    run_workload(ops, options)


@settings(max_examples=40, deadline=None)
@given(
    specs=st.lists(request_specs.map(lambda spec: spec if spec.prompt else RequestSpec(
        [1], spec.max_tokens, spec.salt, spec.image)), min_size=2, max_size=6),
    block_size=st.integers(1, 4), num_spare_blocks=st.integers(0, 3),
    max_batch_size=st.integers(2, 4), max_num_tokens=st.integers(1, 16),
    prefix_caching=st.booleans(), policy=st.sampled_from(["max_utilization", "guaranteed_no_evict"]),
)
def test_pool_that_fits_one_request_at_a_time(
    specs: list[RequestSpec], block_size: int, num_spare_blocks: int, max_batch_size: int,
    max_num_tokens: int, prefix_caching: bool, policy: str,
) -> None:
    longest = max(len(spec.prompt) + spec.max_tokens for spec in specs)
    options: dict[str, object] = {
        "block_size": block_size, "num_blocks": -(-longest // block_size) + num_spare_blocks,
        "max_seq_len": 32, "max_batch_size": max_batch_size, "max_num_tokens": max_num_tokens,
        "prefix_caching": prefix_caching, "policy": policy}
    run_workload([("add", spec) for spec in specs], options)
