"""VL requests across the process boundary: image tensors through shared memory (runtime/core/shm_arrays.py).

On the tiny Qwen2-VL engine, requests with images of three sizes give the in-process engine's greedy
tokens and text through ProcessEngine (the core copies the pixel values and M-RoPE positions out of
each request's segment). After a batch that also holds requests abandoned after their first delta,
one cancelled before any answer and one refused at the engine's door, no segment of this process is
left in /dev/shm and the core's KV pool is back to its baseline. A request sent to a stopped core
holds its segment until the core is killed; then the request fails and the segment is gone. The codec
itself (arrays not in the message, a segment that is gone refused by name):
tests/runtime/core/test_process_engine.py.
"""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from engine_format.engine_dir import load_engine
from runtime.config import EngineConfig
from runtime.core.async_engine import EngineDeadError
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from runtime.core.process_engine import ProcessEngine
from runtime.core.shm_arrays import segment_prefix
from runtime.errors import FieldError
from runtime.multimodal.image_io import ImageLimits
from runtime.multimodal.processor import MultimodalProcessor
from runtime.sampling_params import SamplingParams
from tests.helpers.vl_helpers import noise_image

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
WAIT_S = 60.0
SHM = Path("/dev/shm")


def _leftover_segments() -> list[str]:
    return sorted(p.name for p in SHM.glob(f"{segment_prefix()}*")) if SHM.is_dir() else []


def test_vl_requests_equal_in_process_and_leave_no_segment(build_tiny) -> None:
    engine_dir = build_tiny("tiny-qwen2-vl")
    engine = load_engine(engine_dir)
    from transformers import AutoTokenizer

    processor = MultimodalProcessor(engine, AutoTokenizer.from_pretrained(str(engine.tokenizer_dir)), ImageLimits())
    inputs = [processor.process_text(f"Describe picture {i}:", [noise_image(i, 56 + 28 * i, 84)]) for i in range(3)]

    def request(rid: str, i: int, params: SamplingParams = GREEDY) -> EngineRequest:
        ids, mm = inputs[i]
        return EngineRequest(rid, ids, params, multimodal=mm)

    expected = {rid: collect_text(outs) for rid, outs in EngineCore(engine, EngineConfig(device="cpu")).generate_all(
        [request(f"v{i}", i) for i in range(3)]).items()}
    before = _leftover_segments()
    split = ProcessEngine(engine_dir, EngineConfig(device="cpu"))

    async def collect(r: EngineRequest, first_only: bool = False) -> list:
        outputs = []
        async for out in split.generate(r):
            outputs.append(out)
            if first_only:
                break                    # the client goes away: the request is aborted
        return outputs

    async def scenario() -> None:
        baseline = await split.stats()
        got = await asyncio.wait_for(asyncio.gather(*(collect(request(f"v{i}", i)) for i in range(3)),
                                                    *(collect(request(f"a{i}", i, LONG), True) for i in range(3))),
                                     WAIT_S)
        for i in range(3):
            assert collect_text(got[i]) == expected[f"v{i}"], f"v{i}"
        cancelled = asyncio.create_task(collect(request("c", 1, LONG)))
        await asyncio.sleep(0)           # sent, then given up before any answer
        cancelled.cancel()
        ids, mm = inputs[0]
        with pytest.raises(FieldError):
            await collect(EngineRequest("bad", ids + [10 ** 7], GREEDY, multimodal=mm))
        for _ in range(int(WAIT_S / 0.05)):
            after = await split.stats()
            if after.num_running == after.num_waiting == 0:
                break
            await asyncio.sleep(0.05)
        assert after.num_running == after.num_waiting == 0
        assert after.kv.num_free_blocks == baseline.kv.num_free_blocks
        assert _leftover_segments() == before

        os.kill(split.process.pid, signal.SIGSTOP)      # the core cannot answer: the request keeps its segment
        doomed = asyncio.create_task(collect(request("d", 2)))
        for _ in range(int(WAIT_S / 0.01)):
            if len(_leftover_segments()) > len(before):
                break
            await asyncio.sleep(0.01)
        assert len(_leftover_segments()) == len(before) + 1
        os.kill(split.process.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(doomed, WAIT_S)

    try:
        asyncio.run(scenario())
    finally:
        split.shutdown()
    assert _leftover_segments() == before == []
