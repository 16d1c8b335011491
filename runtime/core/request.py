"""A generation request as the engine thread sees it.

What it is for: the state the scheduler, KV cache manager and sampler share
about one request (token ids, progress, status). Plain Python, no tensors.
Not for: wire formats (grpc_service) or text (the detokenizer keeps that).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from runtime.multimodal.processor import MultimodalInputs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass(frozen=True, slots=True)
class MultimodalSpan:
    """Placeholder tokens [offset, offset + length) stand for content with this hash."""

    offset: int
    length: int
    content_hash: str


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    cache_salt: str | None = None
    mm_spans: tuple[MultimodalSpan, ...] = ()
    multimodal: MultimodalInputs | None = None   # visuals and M-RoPE positions (VL engines)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known so far: prompt plus generated."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_total_tokens(self) -> int:
        """Prompt plus the most tokens this request may generate."""
        return len(self.prompt_token_ids) + self.sampling_params.max_tokens

    def append_output_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.output_token_ids.append(token_id)
