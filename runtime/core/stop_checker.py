"""Per-request stop decision and the text that may be emitted so far.

What it is for: after each generated token and its text delta (from the
IncrementalDetokenizer), say whether the request finishes, why, and which text
the client may see now. Rules, in order of precedence:

1. a stop string (`params.stop`) completed in the text -> FINISHED_STOPPED,
   stop_reason = that string; the text from its first occurrence on is never
   emitted. Stop strings match across token boundaries: text that could be the
   start of a stop string is held back until it is disambiguated. When several
   stop strings complete, the one that completes first in the text wins (ties:
   the one that starts first), as if the text had arrived one character at a
   time, so the result does not depend on how the text was split into tokens;
2. an EOS id (unless `ignore_eos`) -> FINISHED_STOPPED, stop_reason None;
3. a `stop_token_ids` entry -> FINISHED_STOPPED, stop_reason = that id;
4. `max_tokens` output tokens -> FINISHED_LENGTH, stop_reason None.

Rules 1-3 apply only once `num_output_tokens >= min_tokens` (vLLM's rule; the
sampler bans EOS and stop tokens for the first `min_tokens` tokens anyway); the
text of the first `min_tokens - 1` tokens is emitted at once and never matched
against stop strings. The text of a stop token is emitted as the detokenizer
produced it (empty for special tokens when `skip_special_tokens`). When the
request finishes for a reason other than a stop string, everything held back is
emitted, including the detokenizer's own held-back bytes when `flush` is given.
Not for: producing text from ids (runtime/core/detokenizer.py), banning tokens before
min_tokens (runtime/executor/sampler.py), or sequence-length limits of the model (the
scheduler's job).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from runtime.core.request import RequestStatus
from runtime.sampling_params import SamplingParams


class StopDecision(NamedTuple):
    """What `StopChecker.update` decided for one token."""

    emit_text: str                          # text the client may see now
    finish: RequestStatus | None            # None: keep generating
    stop_reason: int | str | None           # stop token id, stop string, or None


class StopCheckerFinishedError(RuntimeError):
    """`update` was called on a request that already finished."""


class StopChecker:
    """Decides when one request stops; keeps back text that may begin a stop string."""

    def __init__(self, params: SamplingParams, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._params = params
        self._eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self._stop_token_ids = frozenset(params.stop_token_ids)
        self._stop_strings = tuple(params.stop)
        self._pending = ""                  # text received but not yet emitted
        self._finish: RequestStatus | None = None

    @property
    def finished(self) -> bool:
        return self._finish is not None

    @property
    def num_held_chars(self) -> int:
        """Characters received but held back (a possible stop-string start)."""
        return len(self._pending)

    def update(self, token_id: int, num_output_tokens: int, text_delta: str,
               flush: Callable[[], str] | None = None) -> StopDecision:
        """Account for one new output token.

        `num_output_tokens` counts the output tokens including `token_id`;
        `text_delta` is the detokenizer's delta for it; `flush` (usually
        `IncrementalDetokenizer.flush`) is called only when the request finishes
        for a token reason, so bytes the detokenizer held back are not lost.
        """
        if self._finish is not None:
            raise StopCheckerFinishedError(
                f"request already finished ({self._finish.value}); got token {token_id}")
        may_stop = num_output_tokens >= self._params.min_tokens
        finish, reason = self._token_finish(token_id, num_output_tokens, may_stop)
        if finish is not None and flush is not None:
            text_delta += flush()
        if not self._stop_strings:      # nothing is ever held back: the rules below without the text matching
            if not may_stop:
                return StopDecision(text_delta, None, None)
            self._finish = finish
            return StopDecision(text_delta, finish, reason)
        if not may_stop:
            # Text before the min_tokens-th token is never a stop-string match
            # (and max_tokens >= min_tokens, so nothing finishes here).
            return StopDecision(self._take_all(text_delta), None, None)

        self._pending += text_delta
        match = self._first_stop_string()
        if match is not None:
            start, stop_string = match
            emit, self._pending = self._pending[:start], ""
            self._finish = RequestStatus.FINISHED_STOPPED
            return StopDecision(emit, self._finish, stop_string)
        if finish is not None:
            self._finish = finish
            return StopDecision(self._take_all(""), finish, reason)
        return StopDecision(self._take_safe_prefix(), None, None)

    def flush(self) -> str:
        """Everything held back, for a request that ends another way (abort, error)."""
        return self._take_all("")

    def _token_finish(self, token_id: int, num_output_tokens: int,
                      may_stop: bool) -> tuple[RequestStatus | None, int | None]:
        if may_stop and token_id in self._eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, None
        if may_stop and token_id in self._stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if num_output_tokens >= self._params.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _take_all(self, extra: str) -> str:
        text, self._pending = self._pending + extra, ""
        return text

    def _first_stop_string(self) -> tuple[int, str] | None:
        """(start, stop string) of the stop string that completes first in `_pending`.

        Everything before `_pending` was emitted and held no stop-string start,
        so every occurrence lies wholly inside it.
        """
        best: tuple[int, int, str] | None = None       # (end, start, stop string)
        for stop_string in self._stop_strings:
            start = self._pending.find(stop_string)
            if start < 0:
                continue
            candidate = (start + len(stop_string), start, stop_string)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _take_safe_prefix(self) -> str:
        """Emit `_pending` except its longest suffix that begins some stop string."""
        num_held = 0
        for stop_string in self._stop_strings:
            longest = min(len(stop_string) - 1, len(self._pending))
            for size in range(longest, num_held, -1):
                if self._pending.endswith(stop_string[:size]):
                    num_held = size
                    break
        cut = len(self._pending) - num_held
        emit, self._pending = self._pending[:cut], self._pending[cut:]
        return emit
