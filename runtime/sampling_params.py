"""Per-request sampling parameters and their validation.

What it is for: the one description of how a request wants tokens chosen and
when it stops. `validate()` is the only place that judges these values; the
sampler and the stop checker trust them afterwards.
Not for: the sampling arithmetic itself (see `runtime/executor/sampler.py`) or the stop
decision (see `runtime/core/stop_checker.py`).

Range checks are written negated (`not (lo <= x <= hi)`) after an
`math.isfinite` check, because NaN passes `x < lo or x > hi`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence, Sized
from dataclasses import dataclass

from runtime.errors import FieldError

MAX_TOKENS_LIMIT = 2**31          # max_tokens must be below this (INT32 on the wire)
SEED_LIMIT = 2**64                # seed must be below this (UINT64 on the wire)
MAX_LOGPROBS = 20                 # most top-n logprobs a request may ask for
PENALTY_LIMIT = 2.0               # presence / frequency penalties lie in [-2, 2]
# The lists of one request are bounded, so that no request can make the server spend seconds before admission
# (tokenizing bad words, decoding stop words) or in each step (bans, stop strings). APIs check the raw lists
# with check_list_size before any work on them; validate() checks them again at the engine's door.
MAX_STOP_STRINGS = 64             # stop strings per request
MAX_STOP_CHARS = 8192             # their characters, all together
MAX_BAD_WORDS = 256               # bad words per request (text or token ids)
MAX_BAD_WORD_CHARS = 16384        # text bad words' characters, all together (before tokenizing)
MAX_BAD_WORD_TOKENS = 4096        # bad words' token ids, all together
MAX_STOP_TOKEN_IDS = 256          # stop token ids per request
GUIDE_KINDS = ("json_object", "json_schema", "regex", "ebnf")
MAX_GUIDE_CHARS = 1 << 16         # a JSON schema, regex or grammar of at most 64 Ki characters
# Temperatures below this mean greedy (argmax): dividing logits by them would overflow float32.
GREEDY_TEMPERATURE = 1e-5


class SamplingParamsError(FieldError):
    """A sampling parameter is out of range; `field` names it."""


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """Structured output: every generated token must keep the text a prefix of the language of `spec`.

    `kind`: json_object (any JSON object; spec unused), json_schema (spec: the schema as JSON text),
    regex, ebnf (GBNF-style grammar with a `root` rule). `prefix` / `suffix` are literal text the
    output starts / ends with around that language (a tool call's tags). Compiled and enforced by
    runtime.structured; an unsupported construct is refused there, naming it.
    """

    kind: str
    spec: str = ""
    prefix: str = ""
    suffix: str = ""

    def validated(self) -> "GuidedDecoding":
        self.validate()
        return self

    def validate(self) -> None:
        if self.kind not in GUIDE_KINDS:
            raise SamplingParamsError("guided_decoding.kind", f"must be one of {GUIDE_KINDS}, got {self.kind!r}")
        for name in ("spec", "prefix", "suffix"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise SamplingParamsError(f"guided_decoding.{name}", "must be a string")
            if len(value) > MAX_GUIDE_CHARS:
                raise SamplingParamsError(f"guided_decoding.{name}", f"{len(value)} characters exceed the "
                                                                      f"limit of {MAX_GUIDE_CHARS}")
        if self.kind != "json_object" and not self.spec:
            raise SamplingParamsError("guided_decoding.spec", f"must not be empty for kind {self.kind!r}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # below GREEDY_TEMPERATURE (e.g. 0) means greedy
    top_k: int = 0                    # 0 means no top-k; > vocab is clamped by the sampler
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    logprobs: int | None = None       # None: no logprobs; 0: sampled token only; n: plus top n
    skip_special_tokens: bool = True
    guided_decoding: GuidedDecoding | None = None   # structured output (runtime.structured)

    @property
    def greedy(self) -> bool:
        """Argmax decoding: the one meaning of greedy (the sampler uses it too)."""
        return self.temperature < GREEDY_TEMPERATURE

    @classmethod
    def greedy_params(cls, max_tokens: int, ignore_eos: bool = False) -> "SamplingParams":
        """Deterministic argmax decoding of up to `max_tokens` tokens."""
        return cls(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)

    def validate(self, vocab_size: int | None = None, eos_token_ids: Sequence[int] = ()) -> "SamplingParams":
        """Raise SamplingParamsError naming the field; return self when valid.

        `vocab_size`, when given, bounds every token id (stop_token_ids,
        bad_words_ids) and refuses bans that leave no token to sample (with
        `eos_token_ids`, banned while min_tokens are due); without it only
        non-negativity is checked.
        """
        check_list_size("stop_token_ids", self.stop_token_ids, MAX_STOP_TOKEN_IDS)
        check_list_size("stop", self.stop, MAX_STOP_STRINGS, MAX_STOP_CHARS, "characters")
        check_list_size("bad_words_ids", self.bad_words_ids, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS, "token ids")
        _check_int("max_tokens", self.max_tokens, 1, MAX_TOKENS_LIMIT - 1)
        _check_float("temperature", self.temperature, 0.0, math.inf)
        _check_int("top_k", self.top_k, 0, None)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                     low_open=True)
        _check_float("presence_penalty", self.presence_penalty, -PENALTY_LIMIT, PENALTY_LIMIT)
        _check_float("frequency_penalty", self.frequency_penalty,
                     -PENALTY_LIMIT, PENALTY_LIMIT)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, SEED_LIMIT - 1)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        _check_bool("ignore_eos", self.ignore_eos)
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_token_ids("stop_token_ids", self.stop_token_ids, vocab_size)
        self._validate_stop()
        self._validate_bad_words(vocab_size)
        check_some_token_allowed(self, vocab_size, eos_token_ids)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.guided_decoding is not None:
            if not isinstance(self.guided_decoding, GuidedDecoding):
                raise SamplingParamsError("guided_decoding", "must be a GuidedDecoding")
            self.guided_decoding.validate()
            # the grammar ends the output with EOS: ignoring or banning EOS would leave nothing to sample
            if self.ignore_eos or self.min_tokens:
                raise SamplingParamsError("ignore_eos" if self.ignore_eos else "min_tokens",
                                          "cannot be combined with guided_decoding (structured output ends "
                                          "with EOS when its grammar is complete)")
        return self

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, (tuple, list)):
            raise SamplingParamsError("stop", "must be a sequence of strings")
        for i, text in enumerate(self.stop):
            if not isinstance(text, str) or not text:
                raise SamplingParamsError("stop", f"entry {i} must be a non-empty string, "
                                                  f"got {text!r}")

    def _validate_bad_words(self, vocab_size: int | None) -> None:
        if not isinstance(self.bad_words_ids, (tuple, list)):
            raise SamplingParamsError("bad_words_ids", "must be a sequence of token-id sequences")
        high = None if vocab_size is None else vocab_size - 1
        for i, word in enumerate(self.bad_words_ids):
            if not isinstance(word, (tuple, list)) or len(word) == 0:
                raise SamplingParamsError(
                    "bad_words_ids", f"entry {i} must be a non-empty sequence of token ids")
            for j, token_id in enumerate(word):
                _check_int("bad_words_ids", token_id, 0, high,
                           what=f"token id at entry {i} index {j}")


def check_list_size(name: str, items: object, max_items: int, max_total: int | None = None,
                    unit: str = "") -> None:
    """Refuse a list field with more than `max_items` entries or, with `max_total`, more than that many `unit`
    (characters, token ids) in all its entries together. The count is checked first, in O(1)."""
    if not isinstance(items, Sized):
        return                       # not a list at all: the field's own type check names it
    if len(items) > max_items:
        raise SamplingParamsError(name, f"{len(items)} entries exceed the limit of {max_items}")
    if max_total is not None:
        total = sum(len(item) for item in items if isinstance(item, Sized))
        if total > max_total:
            raise SamplingParamsError(name, f"{total} {unit} in all exceed the limit of {max_total}")


def check_some_token_allowed(params: SamplingParams, vocab_size: int | None,
                             eos_token_ids: Sequence[int] = ()) -> None:
    """Refuse bans that could leave a step with every token of the vocabulary banned (the sampler would then
    have nothing to draw from). The sampler bans the last token of each bad word (when the text before it
    matches) and, while min_tokens are due, the stop token ids and EOS: if those can cover the vocabulary
    together, the request is refused here. Bad words are checked as if all could match at once (an upper bound)."""
    if vocab_size is None:
        return
    banned = {word[-1] for word in params.bad_words_ids if word}
    if len(banned) + len(params.stop_token_ids) + len(eos_token_ids) < vocab_size:
        return                       # cannot cover the vocabulary (the usual case, decided without a set union)
    if params.min_tokens > 0:
        banned.update(params.stop_token_ids)
        if not params.ignore_eos:
            banned.update(eos_token_ids)
    if len(banned) >= vocab_size:
        during = " with the stop and EOS tokens banned during min_tokens" if params.min_tokens > 0 else ""
        raise SamplingParamsError("bad_words_ids", f"the words' last tokens{during} ban all {vocab_size} tokens "
                                                   "of the vocabulary; leave at least one token allowed")


def _check_int(name: str, value: object, low: int, high: int | None,
               what: str = "") -> None:
    """Require an int in [low, high]; high None means unbounded.

    bool is a subclass of int, but True is not a token count: it is refused.
    `what` prefixes the message (e.g. "token id at index 3") for sequence fields.
    """
    prefix = f"{what} " if what else ""
    if not isinstance(value, int) or isinstance(value, bool):
        raise SamplingParamsError(name, f"{prefix}must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        limit = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise SamplingParamsError(name, f"{prefix}must be in {limit}, got {value}")


def _check_float(name: str, value: object, low: float, high: float,
                 low_open: bool = False) -> None:
    """Require a finite real number in [low, high] (or (low, high] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(name, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:                     # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise SamplingParamsError(name, f"must be finite, got {number}")
    in_range = (low < number if low_open else low <= number) and number <= high
    if not in_range:
        left = "(" if low_open else "["
        right = "]" if math.isfinite(high) else ")"
        raise SamplingParamsError(name, f"must be in {left}{low}, {high}{right}, got {number}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SamplingParamsError(name, f"must be a bool, got {value!r}")


def _check_token_ids(name: str, token_ids: object, vocab_size: int | None) -> None:
    """Require a sequence of ints in [0, vocab_size) (or >= 0 without a vocab)."""
    if not isinstance(token_ids, (tuple, list)):
        raise SamplingParamsError(name, "must be a sequence of token ids")
    high = None if vocab_size is None else vocab_size - 1
    for i, token_id in enumerate(token_ids):
        _check_int(name, token_id, 0, high, what=f"token id at index {i}")
