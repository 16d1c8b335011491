"""Overlap scheduling (runtime/core/overlap.py): the same greedy tokens with overlap on as off.

In-process EngineCore on tiny-qwen2, the same arrivals stepped with overlap off (the plain synchronous
step) and on (step N+1 scheduled and built while N runs on the worker thread): a mixed batch with
different prompt and output lengths, chunked prefill (a prompt longer than the step's token budget), a
stop token id, max_tokens of 1, penalties and min_tokens (sampled after the previous step's update), an
abort mid-run, prefix reuse by a later request, and a structured-output request (its steps fall back to
synchronous) get the same tokens and finish reasons; then a tiny KV pool that forces preemptions. With
overlap on, decode inputs really came from the previous step's sampled tokens (placeholders filled on the
device), the request that stopped on a token had one more token computed and dropped, and every KV block
is free afterwards. A failing step fails only its requests, also for the step launched after it; Qwen2-VL requests with images (chunked image prompts, M-RoPE decode) too. `auto` is
on for CUDA and off on CPU. The served path with overlap on is tests/runtime/core/test_process_engine.py.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine_format.engine_dir import LoadedEngine, load_engine
from runtime.config import EngineConfig, EngineConfigError
from runtime.core.engine_core import EngineCore, EngineRequest
from runtime.core.overlap import overlap_enabled
from runtime.executor.forward_batch import ForwardBatch
from runtime.sampling_params import GuidedDecoding, SamplingParams
from tests.helpers.engine_helpers import assert_all_blocks_free, greedy

SHARED_PREFIX = list(range(300, 340))          # 40 tokens: two full blocks of 16 reusable


@pytest.fixture(scope="module")
def engine(build_tiny) -> LoadedEngine:
    return load_engine(build_tiny("tiny-qwen2"))


class Run:
    """One engine core stepped over timed arrivals; records tokens, finishes and what ran."""

    def __init__(self, engine: LoadedEngine, overlap: str, **config: int) -> None:
        self.core = EngineCore(engine, EngineConfig(device="cpu", overlap=overlap, **config))
        self.num_scheduled: Counter[str] = Counter()
        self.num_placeholder_rows = 0
        schedule, run = self.core.scheduler.schedule, self.core.executor.run

        def counting_schedule():
            plan = schedule()
            self.num_scheduled.update(item.request.request_id for item in plan.scheduled)
            return plan

        def counting_run(batch: ForwardBatch, previous=None):
            if batch.placeholder_rows is not None:
                self.num_placeholder_rows += int(batch.placeholder_rows.numel())
            return run(batch, previous)

        self.core.scheduler.schedule = counting_schedule
        self.core.executor.run = counting_run

    def drive(self, arrivals: list[tuple[int, EngineRequest]], abort_after: dict[str, int] | None = None
              ) -> dict[str, tuple[list[int], str | None]]:
        """Step until done, adding each request at its step; abort a request once it has `n` tokens."""
        pending = sorted(arrivals, key=lambda a: a[0])
        tokens: dict[str, list[int]] = {r.request_id: [] for _, r in arrivals}
        finish: dict[str, str | None] = {}
        step = 0
        while pending or self.core.has_unfinished():
            while pending and pending[0][0] <= step:
                self.core.add_request(pending.pop(0)[1])
            for out in self.core.step():
                tokens[out.request_id].extend(out.token_ids)
                if out.finished:
                    finish[out.request_id] = out.finish_reason
            for request_id, n in (abort_after or {}).items():
                if request_id not in finish and len(tokens[request_id]) >= n:
                    aborted = self.core.abort(request_id)
                    assert aborted is not None and aborted.finished
                    finish[request_id] = aborted.finish_reason
            step += 1
            assert step < 2000
        return {rid: (tokens[rid], finish.get(rid)) for rid in tokens}


def mixed_arrivals(stop_id: int) -> list[tuple[int, EngineRequest]]:
    return [
        (0, EngineRequest("short", [5, 17, 42, 9, 100], greedy(24))),
        (0, EngineRequest("chunked", list(range(200, 260)), greedy(10))),      # 60 tokens > budget 32
        (0, EngineRequest("stop", [7, 1, 8, 2], greedy(30, stop_token_ids=(stop_id,)))),
        (0, EngineRequest("one", [1, 2, 3], greedy(1))),
        (0, EngineRequest("penalties", [7, 8, 9, 7, 8, 9], greedy(14, repetition_penalty=1.3,
                                                                      frequency_penalty=0.5,
                                                                      presence_penalty=0.2))),
        (1, EngineRequest("min", [11, 12, 13], SamplingParams(max_tokens=9, temperature=0.0, min_tokens=7,
                                                              logprobs=2))),
        (1, EngineRequest("abort", [21, 22, 23, 24], greedy(40))),
        (2, EngineRequest("prefix-a", SHARED_PREFIX + [1], greedy(6))),
        (3, EngineRequest("regex", [30, 31, 32], SamplingParams(
            max_tokens=8, temperature=0.0, guided_decoding=GuidedDecoding("regex", "[0-9]{3}")))),
        (9, EngineRequest("prefix-b", SHARED_PREFIX + [2], greedy(8))),
        (12, EngineRequest("late", [50, 60, 70], greedy(12))),
    ]


def test_overlap_gives_the_synchronous_tokens_for_a_mixed_batch(engine) -> None:
    probe = Run(engine, "off").drive([(0, EngineRequest("probe", [7, 1, 8, 2], greedy(24)))])
    probe_tokens = probe["probe"][0]
    # a token the "stop" request first generates after the structured-output request is done (overlapped)
    stop_id = next(t for i, t in enumerate(probe_tokens) if i >= 12 and t not in probe_tokens[:i])
    config = {"max_num_tokens": 32}
    sync, ahead = Run(engine, "off", **config), Run(engine, "on", **config)
    assert not sync.core.overlap and ahead.core.overlap
    expected = sync.drive(mixed_arrivals(stop_id), {"abort": 5})
    got = ahead.drive(mixed_arrivals(stop_id), {"abort": 5})
    assert got == expected
    assert expected["stop"][1] == "stop" and expected["stop"][0][-1] == stop_id
    assert len(expected["abort"][0]) == 5 and expected["abort"][1] == "abort"
    assert expected["regex"][1] == "stop" and expected["one"] == (expected["one"][0], "length")
    # overlap really ran ahead: decode inputs came from the step in flight
    assert ahead.num_placeholder_rows > 50 and sync.num_placeholder_rows == 0
    # the stop token was known only after the next step was launched: one token computed and dropped;
    # a request reaching max_tokens is not scheduled past it
    assert sync.num_scheduled["stop"] == len(expected["stop"][0])
    assert ahead.num_scheduled["stop"] == len(expected["stop"][0]) + 1
    assert ahead.num_scheduled["short"] == sync.num_scheduled["short"]
    for run in (sync, ahead):
        assert run.core.kv_cache.stats().num_hit_tokens >= 32          # prefix-b reused prefix-a's blocks
        assert not run.core.has_unfinished()
        assert_all_blocks_free(run.core)


def test_overlap_with_preemption_in_a_tiny_kv_pool(engine) -> None:
    arrivals = [(i // 2, EngineRequest(f"r{i}", [40 + i, 41, 42, 43 + i] * 5, greedy(36))) for i in range(5)]
    config = {"num_kv_blocks": 9}             # 144 slots; 5 requests of 56 tokens need 20 blocks
    sync, ahead = Run(engine, "off", **config), Run(engine, "on", **config)
    expected = sync.drive(arrivals)
    assert ahead.drive(arrivals) == expected
    assert all(len(tokens) == 36 for tokens, _ in expected.values())
    assert ahead.core.stats().num_preemptions > 0 and sync.core.stats().num_preemptions > 0
    for run in (sync, ahead):
        assert_all_blocks_free(run.core)


def test_a_failing_step_fails_only_its_requests_with_overlap(engine) -> None:
    """The step after a failed one (launched before the failure was known) drops the failed request's
    placeholder row and serves its other requests."""
    poison = 777
    arrivals = [(0, EngineRequest("bad", [poison, 1, 2], greedy(6))),
                (1, EngineRequest("after", [3, 4, 5], greedy(8)))]
    expected = Run(engine, "off").drive(arrivals[1:])
    ahead = Run(engine, "on")
    run = ahead.core.executor.run

    def failing_run(batch: ForwardBatch, previous=None):
        if bool((batch.token_ids == poison).any()):
            raise RuntimeError("device fault")
        return run(batch, previous)

    ahead.core.executor.run = failing_run
    got = ahead.drive(arrivals)
    assert got["bad"] == ([], "error") and got["after"] == expected["after"]
    assert ahead.num_placeholder_rows > 0
    assert_all_blocks_free(ahead.core)


def test_overlap_on_a_vl_engine_gives_the_synchronous_tokens(build_tiny) -> None:
    """M-RoPE decode positions and vision embeddings with placeholders: Qwen2-VL requests with images."""
    from transformers import AutoTokenizer

    from runtime.multimodal.image_io import ImageLimits
    from runtime.multimodal.processor import MultimodalProcessor
    from tests.helpers.vl_helpers import noise_image

    vl = load_engine(build_tiny("tiny-qwen2-vl"))
    processor = MultimodalProcessor(vl, AutoTokenizer.from_pretrained(str(vl.tokenizer_dir)), ImageLimits())
    inputs = [processor.process_text(f"Describe picture {i}:", [noise_image(i, 56 + 28 * i, 84)]) for i in range(2)]
    arrivals = [(i, EngineRequest(f"v{i}", ids, greedy(10 + 3 * i), multimodal=mm))
                for i, (ids, mm) in enumerate(inputs)]
    arrivals.append((1, EngineRequest("text", [5, 6, 7, 8], greedy(12))))
    config = {"max_num_tokens": 48}           # image prompts arrive in chunks
    sync, ahead = Run(vl, "off", **config), Run(vl, "on", **config)
    expected = sync.drive(arrivals)
    assert ahead.drive(arrivals) == expected and ahead.num_placeholder_rows > 0
    assert_all_blocks_free(ahead.core)


def test_overlap_setting_is_validated_and_resolved() -> None:
    with pytest.raises(EngineConfigError) as error:
        EngineConfig(overlap="yes").validate()
    assert error.value.field == "overlap" and "auto" in str(error.value)
    assert overlap_enabled("auto", torch.device("cuda")) and not overlap_enabled("auto", torch.device("cpu"))
    assert overlap_enabled("on", torch.device("cpu")) and not overlap_enabled("off", torch.device("cuda"))
