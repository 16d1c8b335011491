"""One request's output text: detokenize each new token and apply the stop rules to it.

What it is for: `OutputText`, an IncrementalDetokenizer and a StopChecker together,
fed one generated token at a time (`on_token`): the text delta the client may see
and the stop decision that token brings. The in-process EngineCore runs it inside
its step. With the engine core in its own process, the core keeps only the token
rules (`OutputText.tokens_only`: EOS, stop token ids, max_tokens; no text) and the
front end (runtime/core/process_engine.py) runs a full `OutputText` on the token
ids the core sends, so detokenization and stop strings cost the core nothing; both
sides apply the same rules to the same tokens, so they agree on every token finish.
Not for: the rules themselves (runtime/core/stop_checker.py), producing text from
ids (runtime/core/detokenizer.py), or output records (runtime/outputs.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from runtime.core.detokenizer import Decoder, IncrementalDetokenizer
from runtime.core.stop_checker import StopChecker, StopDecision
from runtime.sampling_params import SamplingParams


@dataclass(slots=True)
class OutputText:
    """Text deltas and stop decisions of one request (`detokenizer` None: token rules only, no text)."""

    detokenizer: IncrementalDetokenizer | None
    stop: StopChecker

    @classmethod
    def of(cls, tokenizer: Decoder, prompt_token_ids: Sequence[int], params: SamplingParams,
           eos_token_ids: tuple[int, ...]) -> OutputText:
        """Text and every stop rule (stop strings included)."""
        return cls(IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens),
                   StopChecker(params, eos_token_ids))

    @classmethod
    def tokens_only(cls, params: SamplingParams, eos_token_ids: tuple[int, ...]) -> OutputText:
        """The token rules only (EOS, stop token ids, max_tokens): no text, no stop strings."""
        return cls(None, StopChecker(replace(params, stop=()), eos_token_ids))

    @property
    def finished(self) -> bool:
        return self.stop.finished

    def on_token(self, token_id: int, num_output_tokens: int) -> StopDecision:
        """Account for one new output token (`num_output_tokens` counts it)."""
        if self.detokenizer is None:
            return self.stop.update(token_id, num_output_tokens, "")
        delta = self.detokenizer.add_tokens([token_id])
        return self.stop.update(token_id, num_output_tokens, delta, self.detokenizer.flush)

    def flush(self) -> str:
        """Text held back as a possible stop-string start, for a request that ends another way (abort, error)."""
        return self.stop.flush()
