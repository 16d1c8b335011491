"""Per-request grammar state and the batched token mask the sampler applies.

What it is for: `GrammarState` wraps one request's xgrammar matcher (advanced
by every token the request samples, so it stays in step across preemption,
which keeps the output tokens); `apply_grammar_masks(logits, grammars)` fills
one bitmask row per constrained request and applies them all at once to the
float32 logits in place (tokens the grammar forbids become -inf), and
`accept_tokens` advances the matchers by the sampled tokens. A finished
grammar allows only the stop tokens, so the request ends with EOS. Should
every token be forbidden (another ban removed the grammar's last choices),
the row's stop token is allowed, so the request ends instead of sampling
garbage.
Not for: compiling grammars (grammars.py) or the rest of sampling (runtime/executor/sampler.py).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

LOG = logging.getLogger(__name__)


class GrammarState:
    """One request's position in its grammar."""

    __slots__ = ("matcher", "vocab_size")

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def accept(self, token_id: int) -> bool:
        if self.matcher.is_terminated():
            return False
        accepted = bool(self.matcher.accept_token(token_id))
        if not accepted:
            LOG.warning("grammar refused token %d after masking", token_id)
        return accepted

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.matcher.stop_token_ids)


def apply_grammar_masks(logits: torch.Tensor, grammars: Sequence[GrammarState | None]) -> None:
    """Mask rows of float32 `logits` [B, V] whose request has a grammar, in place."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    import xgrammar

    vocab_size = logits.shape[1]
    bitmask = xgrammar.allocate_token_bitmask(len(logits), vocab_size)
    for i in rows:
        state = grammars[i]
        assert state is not None
        if not state.matcher.is_terminated():
            state.matcher.fill_next_token_bitmask(bitmask, i)
    masked = logits if logits.device.type == "cpu" else logits.cpu()
    xgrammar.apply_token_bitmask_inplace(masked, bitmask, vocab_size=vocab_size, indices=rows)
    all_banned = torch.isinf(masked[rows]).all(dim=1).tolist()
    for i in (row for row, banned in zip(rows, all_banned) if banned):
        state = grammars[i]
        assert state is not None
        stops = [t for t in state.stop_token_ids if t < vocab_size] or [0]
        masked[i, stops[0]] = 0.0
    if masked is not logits:
        logits.copy_(masked)


def accept_tokens(token_ids: Sequence[int], grammars: Sequence[GrammarState | None]) -> None:
    for token_id, state in zip(token_ids, grammars):
        if state is not None:
            state.accept(token_id)
