"""The engine core in its own process (runtime/core/process_engine.py, core_process.py, ipc.py).

Against the in-process EngineCore on the same engine (overlap off; the core process runs with overlap
on): greedy tokens and text of a batch in flight together are identical; a refusal at the engine's door crosses the boundary as a FieldError naming
its field; a consumer that stops reading does not hold the others back, and when it reads again it
gets its pending deltas merged (same tokens and text). The core sends token ids only and the front
end makes the text: stop strings (one spanning tokens, one never met, min_tokens), stop token ids and
skip_special_tokens give the in-process text, tokens, finish and stop reasons; a stop-string hit
aborts the request in the core, whose KV pool returns to its baseline before it could have run to
max_tokens; `add_text` cuts a (merged) delta at the token that completes a stop string and asks for
an abort only where the core has not finished. SIGKILL of the core with requests in flight:
every one ends with EngineDeadError naming the exit code (within a bounded wait: nothing hangs),
`is_running` turns false and a new request is refused at once. The wire codec round-trips a VL
request's arrays without pickle.
"""
from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import fields, replace

import numpy as np
import pytest

from runtime.config import EngineConfig
from runtime.core.async_engine import EngineDeadError
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from runtime.core.ipc import Codec, WireRequest
from runtime.core.output_text import OutputText
from runtime.core.process_engine import ProcessEngine, add_text, merge_outputs
from runtime.core.request import MultimodalSpan
from runtime.core.shm_arrays import SegmentError, release, segment_prefix
from runtime.executor.sampler import TokenLogprobs
from runtime.errors import FieldError
from runtime.multimodal.image_processing import ProcessedVisual
from runtime.multimodal.processor import MultimodalInputs
from runtime.outputs import RequestOutput, Usage
from runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5 + i, 17, 42, 9 + 3 * i, 100] for i in range(5)]
WAIT_S = 60.0


@pytest.fixture(scope="module")
def engine_dir(build_tiny):
    return build_tiny("tiny-qwen2")


@pytest.fixture(scope="module")
def in_process(engine_dir) -> EngineCore:
    return EngineCore.from_dir(engine_dir, EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def split(engine_dir):
    # overlap on in the core (runtime/core/overlap.py): the in-process core it is compared with runs without
    engine = ProcessEngine(engine_dir, EngineConfig(device="cpu", overlap="on"))
    yield engine
    engine.shutdown()


def _requests(tag: str) -> list[EngineRequest]:
    return [EngineRequest(f"{tag}{i}", ids, GREEDY) for i, ids in enumerate(PROMPTS)]


async def _collect(engine: ProcessEngine, request: EngineRequest, resume: asyncio.Event | None = None) -> list:
    outputs = []
    async for out in engine.generate(request):
        outputs.append(out)
        if len(outputs) == 1 and resume is not None:
            await resume.wait()            # a client that stops reading until the others are done
    return outputs


def test_greedy_tokens_refusals_and_a_slow_reader_equal_in_process(in_process, split) -> None:
    expected = {rid: collect_text(outs) for rid, outs in in_process.generate_all(_requests("r")).items()}
    engine = split
    generated_before = engine.query_stats().num_generated_tokens

    async def scenario() -> None:
        requests = _requests("r")
        others_done = asyncio.Event()
        slow = asyncio.create_task(_collect(engine, requests[0], others_done))
        fast = await asyncio.wait_for(asyncio.gather(*(_collect(engine, r) for r in requests[1:])), WAIT_S)
        others_done.set()
        for request, outputs in zip(requests[1:], fast):
            assert collect_text(outputs) == expected[request.request_id]
        slow_outputs = await asyncio.wait_for(slow, WAIT_S)
        assert collect_text(slow_outputs) == expected["r0"]
        assert len(slow_outputs) == 2, "the deltas that piled up while it did not read arrive as one"
        assert slow_outputs[-1].finished and slow_outputs[-1].usage.completion_tokens == GREEDY.max_tokens
        with pytest.raises(FieldError) as refused:
            await _collect(engine, EngineRequest("bad", [10 ** 7], GREEDY))
        assert refused.value.field == "prompt_token_ids"
        stats = await engine.stats()
        assert stats.num_running == 0
        assert stats.num_generated_tokens - generated_before == len(PROMPTS) * GREEDY.max_tokens

    asyncio.run(scenario())


def _final(outputs: list[RequestOutput]) -> tuple[str, list[int], str | None, int | str | None, int]:
    last = outputs[-1]
    assert last.finished and all(not o.finished for o in outputs[:-1])
    return (*collect_text(outputs), last.finish_reason, last.stop_reason, last.usage.completion_tokens)


def test_text_and_stop_rules_run_in_the_front_end_as_in_process(in_process, split) -> None:
    prompt = list(range(500, 520))
    full = in_process.tokenizer.decode(collect_text(in_process.generate_all(
        [EngineRequest("full", prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))])["full"])[1])
    stop = full[12:15]
    assert stop.strip() and len(stop) == 3
    first_id = collect_text(in_process.generate_all([EngineRequest("one", prompt, GREEDY)])["one"])[1][0]
    cases = {
        "stop": SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=("never met", stop)),
        "stop-min": SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(full[1:3],),
                                   min_tokens=6),
        "stop-id": SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(first_id,)),
        "stop-id-min": SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(first_id,), min_tokens=2),
        "eos": SamplingParams(max_tokens=30, temperature=0.0, skip_special_tokens=False),
    }
    requests = [EngineRequest(name, prompt, params) for name, params in cases.items()]
    expected = {rid: _final(outs) for rid, outs in in_process.generate_all(requests).items()}
    assert expected["stop"][2:4] == ("stop", stop) and expected["stop-id"][2:] == ("stop", first_id, 1)
    long_stop = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True, stop=(stop,))

    async def scenario() -> None:
        got = await asyncio.wait_for(asyncio.gather(*(_collect(split, r) for r in requests)), WAIT_S)
        for request, outputs in zip(requests, got):
            assert _final(outputs) == expected[request.request_id], request.request_id
        baseline = await split.stats()
        assert baseline.num_running == 0
        outputs = await asyncio.wait_for(_collect(split, EngineRequest("long-stop", prompt, long_stop)), WAIT_S)
        assert _final(outputs)[:4] == expected["stop"][:4]
        for _ in range(int(WAIT_S / 0.05)):         # the abort reaches the core within a few steps
            after = await split.stats()
            if after.num_running == 0:
                break
            await asyncio.sleep(0.05)
        assert after.num_running == 0 and after.kv.num_free_blocks == baseline.kv.num_free_blocks
        assert after.num_generated_tokens - baseline.num_generated_tokens < long_stop.max_tokens, \
            "the core stopped when the front end saw the stop string, not at max_tokens"

    asyncio.run(scenario())


def test_core_crash_fails_every_request_in_flight(engine_dir) -> None:
    engine = ProcessEngine(engine_dir, EngineConfig(device="cpu"))
    long = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)

    async def scenario() -> list[BaseException]:
        started = asyncio.Event()

        async def consume(i: int) -> BaseException:
            try:
                async for _ in engine.generate(EngineRequest(f"l{i}", [5 + i, 6], long)):
                    started.set()
            except EngineDeadError as exc:
                return exc
            raise AssertionError("a request finished although the core was killed")

        tasks = [asyncio.create_task(consume(i)) for i in range(3)]
        await asyncio.wait_for(started.wait(), WAIT_S)
        os.kill(engine.process.pid, signal.SIGKILL)
        errors = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_collect(engine, EngineRequest("after", [5], GREEDY)), 5.0)
        return errors

    try:
        errors = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert all("exited (code -9)" in str(e) for e in errors), errors
    assert not engine.is_running
    with pytest.raises(EngineDeadError):
        engine.call_threadsafe(lambda core: core.stats()).result(timeout=5)


def test_codec_round_trips_a_vl_request_and_merge_joins_deltas() -> None:
    visual = ProcessedVisual("image", np.arange(24, dtype=np.float32).reshape(4, 6), (1, 2, 2), 0.0, "h")
    mm = MultimodalInputs((visual,), (MultimodalSpan(3, 1, "h"),), np.arange(15, dtype=np.int64).reshape(3, 5), 2)
    request = EngineRequest("x", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, stop=("a",)), "salt", mm)
    codec = Codec()
    message, segment = WireRequest.of(request)
    assert segment is not None and segment.name.startswith(segment_prefix())
    data = codec.encode(message)
    assert visual.pixel_values.tobytes() not in data and mm.mrope_positions.tobytes() not in data, \
        "the arrays travel in the segment, not in the message"
    back = codec.decode_to_core(data)
    assert isinstance(back, WireRequest)
    got = back.engine_request()
    release(segment)
    with pytest.raises(SegmentError, match="is gone"):
        back.engine_request()
    assert WireRequest.of(EngineRequest("t", [1], GREEDY))[1] is None, "text requests need no segment"
    assert (got.request_id, got.prompt_token_ids, got.sampling_params, got.cache_salt) == \
        (request.request_id, request.prompt_token_ids, request.sampling_params, request.cache_salt)
    assert got.multimodal is not None and got.multimodal.spans == mm.spans and got.multimodal.mrope_delta == 2
    assert np.array_equal(got.multimodal.visuals[0].pixel_values, visual.pixel_values)
    assert np.array_equal(got.multimodal.mrope_positions, mm.mrope_positions)
    assert got.multimodal.mrope_positions.dtype == np.int64


    deltas = [RequestOutput("x", t, (i,), i == 2, "length" if i == 2 else None, Usage(5, i + 1, 0, 0.1))
              for i, t in enumerate(["a", "b", "c"])]
    merged = merge_outputs(deltas)
    assert (merged.text, merged.token_ids, merged.finished, merged.finish_reason, merged.usage) == \
        ("abc", (0, 1, 2), True, "length", deltas[-1].usage)


class Letters:
    """Token id i is the letter chr(97 + i) (a Decoder for OutputText)."""

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in token_ids)


def test_add_text_cuts_a_delta_at_the_stop_string_and_says_when_to_abort() -> None:
    params = SamplingParams(max_tokens=10, stop=("cd",))
    first = RequestOutput("x", "", (0,), False, None, Usage(3, 1, 0, 0.1))            # "a"
    text = OutputText.of(Letters(), [20, 21], params, ())
    assert add_text(text, first) == (replace(first, text="a"), False)
    merged = RequestOutput("x", "", (1, 2, 3, 4), False, None, Usage(3, 5, 0, 0.1))  # "bcde": merged deltas
    cut, abort = add_text(text, merged)
    assert abort and (cut.text, cut.token_ids, cut.finished, cut.finish_reason, cut.stop_reason) == \
        ("b", (1, 2, 3), True, "stop", "cd")
    assert cut.usage.completion_tokens == 4, "the token after the stop string is not the client's"
    last = OutputText.of(Letters(), [20], SamplingParams(max_tokens=2, stop=("ab",)), ())
    both, abort = add_text(last, RequestOutput("y", "", (0, 1), True, "length", Usage(1, 2, 0, 0.1)))
    assert not abort and (both.text, both.finish_reason, both.stop_reason) == ("", "stop", "ab"), \
        "a stop string completed by the core's last token wins, and the core has finished already"
    held = OutputText.of(Letters(), [20], SamplingParams(max_tokens=9, stop=("bz",)), ())
    assert add_text(held, RequestOutput("z", "", (0, 1), False, None, Usage(1, 2, 0, 0.1)))[0].text == "a"
    aborted = RequestOutput("z", "", (), True, "abort", Usage(1, 2, 0, 0.1))
    assert add_text(held, aborted) == (replace(aborted, text="b"), False), "held-back text comes with the end"


def test_add_text_keeps_every_field_of_the_cores_delta() -> None:
    """add_text builds its result directly (not dataclasses.replace): every field but the text is the core's,
    also fields added to RequestOutput later (each is set to a non-default value here)."""
    values = {"request_id": "w", "text": "", "token_ids": (0, 1), "finished": True, "finish_reason": "length",
              "usage": Usage(1, 2, 0, 0.1), "stop_reason": 7, "logprobs": (TokenLogprobs(0, -0.5, ()),) * 2,
              "error": "e"}
    assert set(values) == {f.name for f in fields(RequestOutput)}, "give a new RequestOutput field a value here"
    out = RequestOutput(**values)
    text = OutputText.of(Letters(), [20], SamplingParams(max_tokens=9), ())
    assert add_text(text, out) == (replace(out, text="ab"), False)


def test_stream_inbox_hands_over_everything_pending_and_survives_a_cancelled_consumer() -> None:
    """The per-request inbox that replaced asyncio.Queue: `take` waits for the first item and then returns all
    pending ones at once (a consumer that fell behind: one merged delta); an item put after its consumer was
    cancelled mid-wait is kept, not lost, and raises nothing on the event loop."""
    from runtime.core.process_engine import _Stream

    async def scenario() -> None:
        stream = _Stream(asyncio.get_running_loop(), lambda: OutputText(None, None))  # type: ignore[arg-type]
        deltas = [RequestOutput("x", t, (i,), False, None, Usage(5, i + 1, 0, 0.1)) for i, t in enumerate("abc")]
        waiting = asyncio.create_task(stream.take())
        await asyncio.sleep(0)
        assert not waiting.done(), "take waits while nothing is pending"
        stream.put(deltas[0])
        assert await waiting == [deltas[0]]
        stream.put(deltas[1])
        stream.put(deltas[2])
        assert await stream.take() == deltas[1:], "everything pending in one take"
        cancelled = asyncio.create_task(stream.take())
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        error = EngineDeadError("gone")
        stream.put(error)
        assert await asyncio.wait_for(stream.take(), WAIT_S) == [error]

    asyncio.run(scenario())
