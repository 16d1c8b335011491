"""What the engine hands back per request and step: text / token deltas, finish, usage.

What it is for: the output records shared by EngineCore, AsyncEngine,
the CLI and the gRPC layer. Not for: wire encodings.
Records are never changed once made, but not frozen: the engine core makes two per
request per step, and a frozen dataclass's __init__ (object.__setattr__ per field)
cost about three times as much (tiny-qwen2 batch 16, token ids only: the step's
output handling 57 -> 31 us a step).
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.executor.sampler import TokenLogprobs


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    time_to_first_token_s: float | None
    num_preemptions: int = 0
    time_in_queue_s: float | None = None    # arrival -> first scheduled


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    text: str                              # new text since the previous output
    token_ids: tuple[int, ...]             # new token ids since the previous output
    finished: bool
    finish_reason: str | None              # stop | length | abort | error
    usage: Usage
    stop_reason: int | str | None = None   # the stop token id or stop string that ended it
    logprobs: tuple[TokenLogprobs, ...] = ()
    error: str | None = None               # sanitized message when finish_reason is error
