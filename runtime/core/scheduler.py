"""In-flight batching scheduler: which requests run this step, with how many tokens.

What it is for: one rule for prefill, chunked prefill and decode: each step
gives requests new tokens so their computed tokens catch up with their known
tokens (`num_tokens - num_computed_tokens`), within the step budget
(`max_num_tokens` tokens, `max_batch_size` requests). Capacity ("who fits in KV
memory") is a policy: `max_utilization` admits while blocks are free and
preempts the newest running request (recompute) when a running one needs a
block; `guaranteed_no_evict` admits only what it can carry to `max_tokens` and
never preempts. It queues only requests the engine's door
(runtime/core/admission.py) found servable: each fits the whole KV cache alone.

Overlap (runtime/core/overlap.py): `commit_ahead` counts a step's tokens as
computed and its sampled tokens as pending (`Request.num_pending_tokens`) while
it runs, so the next `schedule()` gives a request whose token is still in
flight a one-token decode chunk whose input is a placeholder
(`ScheduledRequest.num_placeholder_tokens`), filled on the device from the
running step's sampled tokens; `update_from_output` of that step then appends
the token. A request whose pending tokens reach max_tokens is not scheduled.

Not for: tensors (the model runner turns a SchedulerOutput into a batch), stop
conditions (EOS, stop strings, max_tokens are judged elsewhere, which then calls
`finish_request`), or threads (only the engine thread calls it).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

from runtime.config import CAPACITY_POLICIES, GUARANTEED_NO_EVICT, MAX_UTILIZATION
from runtime.core.kv_cache import KVCacheManager
from runtime.core.request import Request, RequestStatus
from runtime.errors import FieldError


class SchedulerConfigError(FieldError):
    """A scheduler setting is out of range; `field` names it."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int               # requests per step
    max_num_tokens: int               # tokens per step (the token budget)
    max_seq_len: int                  # prompt + generated tokens of one request
    capacity_policy: str              # "max_utilization" | "guaranteed_no_evict"
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_tokens", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SchedulerConfigError(name, f"must be an integer >= 1, got {value!r}")
        if self.capacity_policy not in CAPACITY_POLICIES:
            raise SchedulerConfigError(
                "capacity_policy", f"must be one of {CAPACITY_POLICIES}, got {self.capacity_policy!r}")
        # Without chunking a whole sequence (a prompt, or a preempted request's
        # prompt plus outputs) must fit one step's budget.
        if not self.enable_chunked_prefill and self.max_num_tokens < self.max_seq_len:
            raise SchedulerConfigError(
                "max_num_tokens",
                f"({self.max_num_tokens}) must be >= max_seq_len ({self.max_seq_len}) "
                "when enable_chunked_prefill is false")


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: tokens [num_computed_tokens, +num_new_tokens).

    The per-step view the executor reads (with the request's record behind it). Not changed after the
    scheduler makes it; not frozen only because a frozen dataclass's __init__ costs about three times as
    much, and one is made per running request per step.
    """

    request: Request
    num_new_tokens: int
    num_computed_tokens: int          # before this step
    block_ids: list[int]
    # request.num_tokens plus its pending tokens when scheduled, so `samples` keeps its meaning after
    # update_from_output appends a token.
    num_known_tokens: int
    # Trailing tokens of the chunk sampled by the step in flight (overlap): not yet known on the host,
    # the executor takes them from that step's sampled-token tensor.
    num_placeholder_tokens: int = 0

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the last known token, so the step samples a token."""
        return self.num_computed_tokens + self.num_new_tokens == self.num_known_tokens

    @property
    def num_new_prompt_tokens(self) -> int:
        """Prompt tokens this chunk computes (prefill); the rest are generated tokens (decode, recompute)."""
        return max(0, min(self.num_computed_tokens + self.num_new_tokens, self.request.num_prompt_tokens)
                   - self.num_computed_tokens)

    @property
    def token_ids(self) -> list[int]:
        """The chunk's tokens known on the host: all but the trailing `num_placeholder_tokens`."""
        # Slice prompt and output separately: building all_token_ids each step is O(sequence).
        start = self.num_computed_tokens
        end = start + self.num_new_tokens - self.num_placeholder_tokens
        prompt = self.request.prompt_token_ids
        if start >= len(prompt):
            return self.request.output_token_ids[start - len(prompt):end - len(prompt)]
        return prompt[start:end] + self.request.output_token_ids[:max(0, end - len(prompt))]


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    preempted_request_ids: list[str]
    # Requests finished (or aborted) since the previous schedule(): the model
    # runner drops any per-request state it keeps for them.
    finished_request_ids: list[str] = field(default_factory=list)
    # commit_ahead(): its tokens already count as computed and its sampled tokens as pending
    scheduled_ahead: bool = False

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def sampling_requests(self) -> list[Request]:
        """The requests that sample a token this step, in the order of the executor's logits rows."""
        return [item.request for item in self.scheduled if item.samples]

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens computed this step."""
        return sum(item.num_new_prompt_tokens for item in self.scheduled
                   if item.num_computed_tokens < len(item.request.prompt_token_ids))


class Scheduler:
    """Waiting queue (FCFS, preempted at the front) plus running list, over one KV cache."""

    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self._config = config
        self._kv = kv_cache
        self._requests: dict[str, Request] = {}
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []           # in admission order, oldest first
        self._finished_since_schedule: list[str] = []

    # -------------------------------------------------------------- queries

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def kv_cache(self) -> KVCacheManager:
        return self._kv

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting_request_ids(self) -> list[str]:
        """Waiting and preempted requests in the order they will be admitted."""
        return [request.request_id for request in self._waiting]

    def has_request(self, request_id: str) -> bool:
        """Whether the id is queued, running or preempted (not yet finished)."""
        return request_id in self._requests

    # ------------------------------------------------------------ admission

    def add_request(self, request: Request) -> None:
        """Queue an admitted request (runtime/core/admission.py has checked it can ever be served)."""
        assert request.request_id not in self._requests, "admission refuses an id in flight"
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._waiting.append(request)

    # ------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts; allocate their KV blocks."""
        token_budget = self._config.max_num_tokens
        scheduled: list[ScheduledRequest] = []
        preempted_ids: list[str] = []

        index = 0
        running = self._running
        while index < len(running) and token_budget > 0:
            request = running[index]
            index += 1
            num_output = len(request.output_token_ids)
            num_pending = request.num_pending_tokens
            if num_pending and num_output + num_pending >= request.sampling_params.max_tokens:
                continue                      # its step in flight samples its last token
            num_tokens = len(request.prompt_token_ids) + num_output
            num_computed = request.num_computed_tokens
            num_new = min(num_tokens + num_pending - num_computed, token_budget)
            if num_new <= 0:
                continue
            block_ids = self._allocate_or_preempt(request, num_new, preempted_ids)
            if block_ids is None:
                if request.status is RequestStatus.PREEMPTED:
                    break                     # it was the newest; nothing runs after it
                continue                      # guaranteed_no_evict: cannot happen, skip defensively
            scheduled.append(ScheduledRequest(request, num_new, num_computed, block_ids, num_tokens + num_pending,
                                              max(0, num_computed + num_new - num_tokens)))
            token_budget -= num_new

        # After a preemption the pool is short: admitting now would only thrash.
        if not preempted_ids:
            token_budget = self._admit_waiting(token_budget, scheduled)

        finished_ids = self._finished_since_schedule
        self._finished_since_schedule = []
        return SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=self._config.max_num_tokens - token_budget,
            preempted_request_ids=preempted_ids,
            finished_request_ids=finished_ids,
        )

    def _allocate_or_preempt(
        self, request: Request, num_new: int, preempted_ids: list[str]
    ) -> list[int] | None:
        """Blocks for a running request; under max_utilization preempt the newest until they fit."""
        while True:
            block_ids = self._kv.allocate_slots(request, num_new)
            if block_ids is not None or self._config.capacity_policy != MAX_UTILIZATION:
                return block_ids
            victim = self._running.pop()
            self._preempt(victim)
            preempted_ids.append(victim.request_id)
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks; it recomputes prompt and outputs when readmitted."""
        self._kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._waiting.appendleft(request)

    def _admit_waiting(self, token_budget: int, scheduled: list[ScheduledRequest]) -> int:
        """Admit waiting requests FCFS; stop at the first that cannot be admitted."""
        num_reserved = self._num_reserved_blocks()
        while self._waiting and token_budget > 0 and len(self._running) < self._config.max_batch_size:
            request = self._waiting[0]
            assert not request.num_pending_tokens, "a step in flight is updated before the next schedule"
            computed_blocks, num_hit_tokens = self._kv.get_computed_blocks(request)
            num_new = request.num_tokens - num_hit_tokens
            if num_new > token_budget:
                if not self._config.enable_chunked_prefill:
                    break
                num_new = token_budget
            num_worst_case = self._kv.num_blocks_needed(request.max_total_tokens)
            if self._config.capacity_policy == GUARANTEED_NO_EVICT:
                if num_worst_case > self._kv.num_free_blocks - num_reserved:
                    break
            block_ids = self._kv.allocate_slots(request, num_new, computed_blocks)
            if block_ids is None:
                break
            self._waiting.popleft()
            if request.status is RequestStatus.WAITING:   # first admission, not a resume
                request.num_cached_tokens = min(num_hit_tokens, request.num_prompt_tokens)
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            scheduled.append(ScheduledRequest(request, num_new, num_hit_tokens, block_ids, request.num_tokens))
            token_budget -= num_new
            num_reserved += max(num_worst_case - len(block_ids), 0)
        return token_budget

    def _num_reserved_blocks(self) -> int:
        """Blocks running requests may still claim before reaching max_tokens."""
        if self._config.capacity_policy != GUARANTEED_NO_EVICT:
            return 0
        return sum(
            max(self._kv.num_blocks_needed(r.max_total_tokens) - len(self._kv.block_ids(r.request_id)), 0)
            for r in self._running
        )

    # --------------------------------------------------------------- update

    def commit_ahead(self, output: SchedulerOutput) -> SchedulerOutput:
        """Count the step's tokens as computed and its sampled tokens as pending before it has run (overlap);
        returns the output marked so that `update_from_output` only caches blocks and appends tokens."""
        for item in output.scheduled:
            item.request.num_computed_tokens = item.num_computed_tokens + item.num_new_tokens
            if item.samples:
                item.request.num_pending_tokens += 1
        return replace(output, scheduled_ahead=True)

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Advance computed tokens, cache full blocks, append sampled tokens.

        Returns the requests that got a new token (for the stop checker). Requests
        finished between schedule() and this call are skipped. Raises ValueError,
        changing nothing, when a request whose chunk reached its last token has
        no sampled token.
        """
        requests = self._requests
        live: list[tuple[ScheduledRequest, bool]] = []      # (item, whether it samples)
        for item in output.scheduled:
            request = item.request
            if requests.get(request.request_id) is not request or request.status.finished:
                continue
            samples = item.samples
            if samples and request.request_id not in sampled_token_ids:
                raise ValueError(
                    f"sampled_token_ids: no token for request {request.request_id!r}, "
                    "whose chunk reached its last known token")
            live.append((item, samples))
        ahead = output.scheduled_ahead
        sampled: list[Request] = []
        for item, samples in live:
            request = item.request
            end = item.num_computed_tokens + item.num_new_tokens
            if not ahead:
                request.num_computed_tokens = end
            if request.status is RequestStatus.RUNNING:     # not preempted while the step ran ahead
                self._kv.cache_full_blocks(request, end)
            if samples:
                if ahead:
                    request.num_pending_tokens -= 1
                request.append_output_token(sampled_token_ids[request.request_id])
                sampled.append(request)
        return sampled

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Remove a waiting, running or preempted request and free its blocks; returns its record.

        Returns None (changing nothing) for an unknown or already finished id.
        """
        if not status.finished:
            raise ValueError(f"status: {status.name} is not a finished status")
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        if request in self._running:
            self._running.remove(request)
        else:
            self._waiting.remove(request)
        self._kv.free(request)
        request.status = status
        self._finished_since_schedule.append(request_id)
        return request
