"""In-flight batching end to end on the tiny engine: every request gets the tokens it gets alone."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from runtime.core.async_engine import AsyncEngine, EngineDeadError
from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from engine_format.engine_dir import load_engine
from runtime.executor.model import DecoderModel
from runtime.sampling_params import SamplingParams
from runtime.core.admission import RequestRejectedError
from runtime.executor.sequential import SequentialRunner
from tests.helpers.engine_helpers import (
    assert_all_blocks_free,
    greedy,
    run_arrivals,
)


@pytest.fixture(scope="module")
def engine(build_tiny):
    return load_engine(build_tiny("tiny-qwen2"))


@pytest.fixture(scope="module")
def reference(engine):
    """Greedy tokens of one prompt alone, through the simplest loop (no scheduler, no sharing)."""
    runner = SequentialRunner(DecoderModel(engine.llm_config, engine.weights, torch.device("cpu")), 1024)
    cache: dict[tuple, list[int]] = {}

    def greedy(ids: list[int], max_tokens: int) -> list[int]:
        key = (tuple(ids), max_tokens)
        if key not in cache:
            cache[key] = runner.greedy(ids, max_tokens)
        return cache[key]

    return greedy


def random_requests(n: int, seed: int, vocab: int, max_prompt: int = 90, max_out: int = 24):
    rng = random.Random(seed)
    return [(f"r{i}", [rng.randrange(vocab - 8) for _ in range(rng.randint(1, max_prompt))],
             rng.randint(1, max_out), rng.randint(0, 30)) for i in range(n)]


def run_with_arrivals(core: EngineCore, requests, params_for=greedy) -> dict[str, list[int]]:
    """requests: (id, prompt ids, max_tokens, arrival step)."""
    return run_arrivals(core, [(at, EngineRequest(rid, ids, params_for(n))) for rid, ids, n, at in requests])


@pytest.mark.parametrize("config", [
    EngineConfig(),
    EngineConfig(max_num_tokens=16),                       # chunked prefill, small step budget
    EngineConfig(max_num_tokens=7, max_batch_size=3),      # budget below the block size
], ids=["default", "budget16", "budget7-batch3"])
def test_batched_equals_alone_with_random_arrivals(engine, reference, config: EngineConfig) -> None:
    core = EngineCore(engine, config)
    requests = random_requests(36, seed=11, vocab=engine.llm_config.vocab_size)
    got = run_with_arrivals(core, requests)
    for rid, ids, max_tokens, _ in requests:
        assert got[rid] == reference(ids, max_tokens), rid
    assert_all_blocks_free(core)


def test_prefix_reuse_computes_only_the_suffix(engine, reference) -> None:
    core = EngineCore(engine)
    prefix = list(range(100, 164))                  # 4 full blocks of 16
    first, second = prefix + [5, 6, 7], prefix + [9, 10]
    out1 = core.generate_all([EngineRequest("a", first, greedy(8))])["a"]
    computed_before = core.stats().num_computed_prompt_tokens
    out2 = core.generate_all([EngineRequest("b", second, greedy(8))])["b"]
    assert out2[-1].usage.cached_tokens == 64
    assert core.stats().num_computed_prompt_tokens - computed_before == len(second) - 64
    assert collect_text(out1)[1] == reference(first, 8)
    assert collect_text(out2)[1] == reference(second, 8)
    assert core.stats().kv.num_hit_tokens >= 64
    no_reuse = EngineCore(engine, EngineConfig(enable_prefix_caching=False))
    again = no_reuse.generate_all([EngineRequest("b", second, greedy(8))])["b"]
    assert again[-1].usage.cached_tokens == 0
    assert collect_text(again)[1] == collect_text(out2)[1]
    assert_all_blocks_free(core)


def test_cache_salt_isolates_prefixes(engine) -> None:
    core = EngineCore(engine)
    ids = list(range(200, 250))
    core.generate_all([EngineRequest("a", ids, greedy(2), cache_salt="tenant-1")])
    out = core.generate_all([EngineRequest("b", ids, greedy(2), cache_salt="tenant-2")])["b"]
    assert out[-1].usage.cached_tokens == 0
    out = core.generate_all([EngineRequest("c", ids, greedy(2), cache_salt="tenant-1")])["c"]
    assert out[-1].usage.cached_tokens == 48


def test_small_pool_max_utilization_preempts_and_matches(engine, reference) -> None:
    core = EngineCore(engine, EngineConfig(num_kv_blocks=14))
    requests = [(f"p{i}", list(range(300 + 40 * i, 300 + 40 * i + 30)), 40, 0) for i in range(6)]
    got = run_with_arrivals(core, requests)
    assert core.stats().num_preemptions > 0
    for rid, ids, max_tokens, _ in requests:
        assert got[rid] == reference(ids, max_tokens), rid
    assert_all_blocks_free(core)


def test_small_pool_guaranteed_no_evict_never_preempts(engine, reference) -> None:
    core = EngineCore(engine, EngineConfig(num_kv_blocks=14, capacity_policy="guaranteed_no_evict"))
    requests = [(f"g{i}", list(range(600 + 40 * i, 600 + 40 * i + 30)), 40, 0) for i in range(6)]
    got = run_with_arrivals(core, requests)
    assert core.stats().num_preemptions == 0
    for rid, ids, max_tokens, _ in requests:
        assert got[rid] == reference(ids, max_tokens), rid
    assert_all_blocks_free(core)


def test_request_larger_than_pool_is_rejected_and_does_not_block(engine) -> None:
    core = EngineCore(engine, EngineConfig(num_kv_blocks=4))
    with pytest.raises(RequestRejectedError, match="max_tokens") as info:
        core.add_request(EngineRequest("big", list(range(40)), greedy(100)))
    assert info.value.field == "max_tokens"
    out = core.generate_all([EngineRequest("small", list(range(10)), greedy(5))])["small"]
    assert out[-1].finish_reason == "length"


@pytest.mark.parametrize("ids,params,field", [
    ([], greedy(4), "prompt_token_ids"),
    ([1, 2, 10 ** 6], greedy(4), "prompt_token_ids"),
    ([1, -1], greedy(4), "prompt_token_ids"),
    (list(range(2000)), greedy(4), "prompt_token_ids"),          # beyond max_input_len 1024
    ([1, 2], greedy(2048), "max_tokens"),                       # beyond max_seq_len 2048
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(max_tokens=2 ** 31), "max_tokens"),
    ([1, 2], SamplingParams(temperature=float("nan")), "temperature"),
    ([1, 2], SamplingParams(top_p=float("inf")), "top_p"),
])
def test_bad_requests_are_rejected_with_the_field(engine, ids, params, field) -> None:
    core = EngineCore(engine)
    with pytest.raises(ValueError) as info:
        core.add_request(EngineRequest("bad", ids, params))
    assert info.value.field == field, str(info.value)
    assert not core.has_unfinished()
    assert_all_blocks_free(core)


def test_seeded_sampling_reproducible_across_batch_compositions(engine) -> None:
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    target = list(range(400, 420))
    alone = EngineCore(engine).generate_all([EngineRequest("t", target, params)])["t"]
    others = [EngineRequest(f"o{i}", list(range(10 * i, 10 * i + 5 + i)),
                            SamplingParams(max_tokens=30, temperature=1.0, seed=None if i % 2 else i))
              for i in range(5)]
    mixed = EngineCore(engine).generate_all(others[:2] + [EngineRequest("t", target, params)] + others[2:])["t"]
    assert collect_text(alone)[1] == collect_text(mixed)[1]
    other_seed = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=99, ignore_eos=True)
    different = EngineCore(engine).generate_all([EngineRequest("t", target, other_seed)])["t"]
    assert collect_text(different)[1] != collect_text(alone)[1]


def test_stop_string_min_tokens_and_eos(engine, reference) -> None:
    core = EngineCore(engine)
    ids = list(range(500, 520))
    full = core.tokenizer.decode(reference(ids, 40), skip_special_tokens=True)
    stop = full[12:15]
    assert stop.strip() and len(stop) == 3
    out = core.generate_all([EngineRequest("s", ids, greedy(40, stop=(stop,)))])["s"]
    text = collect_text(out)[0]
    assert out[-1].finish_reason == "stop" and out[-1].stop_reason == stop
    assert text == full[:full.index(stop)]
    eos = reference(ids, 1)[0]
    stop_tok = core.generate_all([EngineRequest("e", ids, greedy(10, stop_token_ids=(eos,)))])["e"]
    assert stop_tok[-1].finish_reason == "stop" and stop_tok[-1].usage.completion_tokens == 1
    min_tok = core.generate_all([EngineRequest("m", ids, greedy(10, stop_token_ids=(eos,), min_tokens=4))])["m"]
    assert min_tok[-1].usage.completion_tokens >= 4


def test_async_streaming_abort_frees_blocks_within_one_step(engine) -> None:
    async def scenario() -> None:
        core = EngineCore(engine)
        async_engine = AsyncEngine(core)
        try:
            stream = async_engine.generate(EngineRequest("long", list(range(50)), greedy(500)))
            seen = 0
            async for out in stream:
                seen += 1
                if seen == 3:
                    break
            await stream.aclose()
            for _ in range(100):
                stats = await async_engine.stats()
                if stats.num_running == 0 and stats.kv.num_used_blocks == 0:
                    break
                await asyncio.sleep(0.01)
            assert stats.num_running == 0 and stats.kv.num_used_blocks == 0
            short = [o async for o in async_engine.generate(EngineRequest("next", [1, 2, 3], greedy(3)))]
            assert short[-1].finished and short[-1].usage.completion_tokens == 3
        finally:
            async_engine.shutdown()

    asyncio.run(scenario())


def test_async_admission_error_is_raised_to_the_caller(engine) -> None:
    async def scenario() -> None:
        async_engine = AsyncEngine(EngineCore(engine))
        try:
            with pytest.raises(ValueError, match="temperature"):
                async for _ in async_engine.generate(EngineRequest("x", [1], SamplingParams(temperature=-1.0))):
                    pass
            outs = [o async for o in async_engine.generate(EngineRequest("y", [1, 2], greedy(2)))]
            assert outs[-1].finish_reason == "length"
        finally:
            async_engine.shutdown()

    asyncio.run(scenario())


def test_call_threadsafe_needs_no_event_loop(engine) -> None:
    """What a metrics scrape uses from its own HTTP thread: engine stats without any asyncio loop; once the
    engine thread has stopped, the call fails at once instead of waiting for a thread that will never run it."""
    async_engine = AsyncEngine(EngineCore(engine))
    try:
        stats = async_engine.call_threadsafe(lambda core: core.stats()).result(timeout=30)
        assert stats.num_running == 0 and stats.kv.num_used_blocks == 0
    finally:
        async_engine.shutdown()
    with pytest.raises(EngineDeadError):
        async_engine.call_threadsafe(lambda core: core.stats()).result(timeout=1)


def test_failing_step_fails_only_its_requests(engine, reference, monkeypatch) -> None:
    core = EngineCore(engine)
    real_execute = core.executor.execute
    poison = 777

    def execute(output):
        if any(poison in s.token_ids for s in output.scheduled):
            raise RuntimeError("device fault with internal detail /secret/path")
        return real_execute(output)

    monkeypatch.setattr(core.executor, "execute", execute)
    results = core.generate_all([EngineRequest("bad", [poison, 1, 2], greedy(5))])
    final = results["bad"][-1]
    assert final.finished and final.finish_reason == "error"
    assert "secret" not in (final.error or "") and final.error
    ok = core.generate_all([EngineRequest("good", [3, 4, 5], greedy(5))])["good"]
    assert collect_text(ok)[1] == reference([3, 4, 5], 5)
    assert_all_blocks_free(core)
