"""A generation request: the API's input record and the engine's one record per request.

What it is for: `EngineRequest`, what a caller hands the engine (immutable), and
`Request`, the one record the engine core keeps for it from admission to
finish: its inputs (tokens, parameters, images, cache salt), its progress
(computed and generated tokens, status, preemptions, times) and its output
state (the seeded random stream the sampler draws from, the detokenizer and the
stop rules). The scheduler, the KV cache manager, the sampler and the engine
loop all read this record; nothing copies parts of it.
Not for: validation (runtime/core/admission.py judges an EngineRequest once,
before a Request exists), wire formats (grpc_service), or the per-step view the
executor gets (`ScheduledRequest` in runtime/core/scheduler.py).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from runtime.core.output_text import OutputText
    from runtime.multimodal.processor import MultimodalInputs
    from runtime.structured.bitmask import GrammarState


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
        return self in _FINISHED_STATUSES


_FINISHED_STATUSES = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                                RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR})


@dataclass(frozen=True, slots=True)
class MultimodalSpan:
    """Placeholder tokens [offset, offset + length) stand for content with this hash."""

    offset: int
    length: int
    content_hash: str


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """A request as callers of the engine (the service, the CLI, tests) submit it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    cache_salt: str | None = None
    multimodal: MultimodalInputs | None = None     # images / videos of the prompt (VL engines)


@dataclass(slots=True, eq=False)
class Request:
    """One admitted request inside the engine core (see the module docstring)."""

    # -- inputs, fixed at admission
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    cache_salt: str | None = None
    multimodal: MultimodalInputs | None = None   # visuals, spans and M-RoPE positions (VL engines)
    # -- output state (the engine sets the output text at admission; tests of the scheduler and
    #    sampler, which need tokens only, leave it None)
    generator: torch.Generator | None = None     # a seeded request's own random stream; None: the sampler's
    output_text: OutputText | None = None        # detokenizer and stop rules (token rules only in a core process)
    grammar: GrammarState | None = None           # structured output: its matcher, advanced by the sampler
    # -- progress
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens a step in flight will sample (overlap, runtime/core/overlap.py): counted as known by the scheduler,
    # not yet in output_token_ids; 0 or 1.
    num_pending_tokens: int = 0
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # The prompt as an int64 tensor, built once by the sampler when a penalty needs it.
    prompt_ids_tensor: torch.Tensor | None = field(default=None, repr=False)
    # Set once by the sampler: the number of output tokens from which its logit processing changes
    # nothing for this request (plain greedy: argmax of the raw logits); -1: never.
    plain_greedy_from: int | None = field(default=None, repr=False)

    @property
    def mm_spans(self) -> tuple[MultimodalSpan, ...]:
        """The placeholder spans of the prompt's images and videos (prefix-cache keys)."""
        return self.multimodal.spans if self.multimodal is not None else ()

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
