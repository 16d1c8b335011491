"""Helpers shared by the engine tests (text and vision-language): greedy parameters, a driver that
admits requests at given steps, one request's tokens alone on a fresh core, the logits recorder, and the
check that every KV block came back."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine_format.engine_dir import LoadedEngine
from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from runtime.sampling_params import SamplingParams


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run_arrivals(core: EngineCore, arrivals: list[tuple[int, EngineRequest]]) -> dict[str, list[int]]:
    """Step the engine, adding each request at its arrival step; the tokens each request got."""
    pending = sorted(arrivals, key=lambda a: a[0])
    tokens: dict[str, list[int]] = {r.request_id: [] for _, r in arrivals}
    step = 0
    while pending or core.has_unfinished():
        while pending and pending[0][0] <= step:
            core.add_request(pending.pop(0)[1])
        for out in core.step():
            tokens[out.request_id].extend(out.token_ids)
        step += 1
        assert step < 10_000
    return tokens


def tokens_alone(engine: LoadedEngine, request: EngineRequest) -> list[int]:
    """The tokens of `request` run alone on a fresh engine core without prefix caching."""
    core = EngineCore(engine, EngineConfig(enable_prefix_caching=False))
    return collect_text(core.generate_all([request])[request.request_id])[1]


@contextmanager
def recording_logits(core: EngineCore) -> Iterator[list[torch.Tensor]]:
    """The logits rows of every step run inside the block, recorded from the executor (restored after)."""
    rows: list[torch.Tensor] = []
    execute = core.executor.execute

    def recording(output):
        logits = execute(output)
        rows.extend(logits)
        return logits

    core.executor.execute = recording
    try:
        yield rows
    finally:
        core.executor.execute = execute


def assert_all_blocks_free(core: EngineCore) -> None:
    stats = core.kv_cache.stats()
    assert stats.num_used_blocks == 0 and stats.num_free_blocks == stats.total_num_blocks
    core.kv_cache.check_invariants()
