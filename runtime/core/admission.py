"""The engine's door: the one check a request passes before the engine changes anything.

What it is for: `check_request`, which judges an `EngineRequest` as a whole
against the engine's `AdmissionLimits`: its id is not in flight; its sampling
parameters are valid (`SamplingParams.validate`, token ids bounded by the
vocabulary); its prompt is non-empty, within `max_input_len` and inside the
vocabulary; prompt plus `max_tokens` fit `max_seq_len` and the whole KV cache
(a request larger than the cache is refused here, never retried); its images
and videos agree with the prompt (`check_multimodal`). Every refusal is a
FieldError whose `field` names the request field and whose message gives the
limit (RequestRejectedError here; SamplingParamsError and the multimodal
FieldError from their own checks). What passes, the scheduler, the sampler and
the stop checker trust.
Not for: whether a request fits *now* (the scheduler waits or preempts), wire
concerns (the service layer parses, tokenizes and renames fields to its API's
names), or building the engine's record (EngineCore.add_request does that).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from runtime.core.request import EngineRequest
from runtime.errors import FieldError
from runtime.families.base import VisionFamily
from runtime.multimodal.processor import check_multimodal
from runtime.sampling_params import SamplingParams


class RequestRejectedError(FieldError):
    """A request can never be served by this engine; `field` names why."""


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    """What an engine can serve at all (build limits and the size of its KV cache)."""

    vocab_size: int
    max_input_len: int                # prompt tokens
    max_seq_len: int                  # prompt + generated tokens of one request
    num_kv_blocks: int
    tokens_per_block: int
    vision: VisionFamily | None = None   # VL engines: placeholders and positions; None: text only
    eos_token_ids: tuple[int, ...] = ()   # banned while min_tokens are due (SamplingParams.validate)

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)


def check_request(request: EngineRequest, limits: AdmissionLimits,
                  in_flight: Callable[[str], bool]) -> SamplingParams:
    """Raise a FieldError naming the field and the limit, or return the request's validated parameters.

    `in_flight(request_id)` says whether that id is queued or running already.
    """
    if in_flight(request.request_id):
        raise RequestRejectedError("request_id", f"{request.request_id!r} is already queued or running")
    params = request.sampling_params.validate(limits.vocab_size, limits.eos_token_ids)
    _check_prompt(request.prompt_token_ids, limits)
    _check_capacity(len(request.prompt_token_ids), params.max_tokens, limits)
    check_multimodal(request.prompt_token_ids, request.multimodal, limits.vision)
    return params


def _check_prompt(ids: list[int], limits: AdmissionLimits) -> None:
    if not ids:
        raise RequestRejectedError("prompt_token_ids", "prompt is empty (needs >= 1 token)")
    if len(ids) > limits.max_input_len:
        raise RequestRejectedError("prompt_token_ids", f"prompt ({len(ids)} tokens) exceeds max_input_len "
                                                       f"({limits.max_input_len})")
    vocab = limits.vocab_size
    bad = next((i for i, t in enumerate(ids) if not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise RequestRejectedError("prompt_token_ids", f"token id {ids[bad]!r} at index {bad} is outside the "
                                                       f"vocabulary [0, {vocab})")


def _check_capacity(num_prompt: int, max_tokens: int, limits: AdmissionLimits) -> None:
    """Prompt + max_tokens within max_seq_len and within the whole KV cache."""
    max_seq_len = limits.max_seq_len
    if num_prompt > max_seq_len:
        raise RequestRejectedError("prompt_token_ids",
                                   f"prompt ({num_prompt}) exceeds max_seq_len ({max_seq_len})")
    if num_prompt + max_tokens > max_seq_len:
        raise RequestRejectedError(
            "max_tokens", f"prompt ({num_prompt}) + max_tokens ({max_tokens}) exceeds max_seq_len ({max_seq_len})")
    num_blocks = limits.num_kv_blocks
    capacity = f"the whole KV cache ({num_blocks} blocks of {limits.tokens_per_block} tokens)"
    if limits.num_blocks_needed(num_prompt) > num_blocks:
        raise RequestRejectedError("prompt_token_ids", f"prompt ({num_prompt}) needs more blocks than {capacity}")
    num_needed = limits.num_blocks_needed(num_prompt + max_tokens)
    if num_needed > num_blocks:
        raise RequestRejectedError(
            "max_tokens",
            f"prompt ({num_prompt}) + max_tokens ({max_tokens}) needs {num_needed} blocks, more than {capacity}")
