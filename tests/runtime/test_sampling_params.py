"""SamplingParams.validate: every bad value raises SamplingParamsError naming the field."""
from __future__ import annotations

import math
import re

import pytest

from runtime.sampling_params import (
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    SamplingParamsError,
)

NAN = math.nan
INF = math.inf

INVALID = [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 2**31), ("max_tokens", True),
    ("max_tokens", 1.5), ("max_tokens", None),
    ("temperature", NAN), ("temperature", INF), ("temperature", -INF), ("temperature", -0.1),
    ("temperature", "1"), ("temperature", 10**400),
    ("top_k", -1), ("top_k", 1.0), ("top_k", False),
    ("top_p", NAN), ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.0001), ("top_p", INF),
    ("min_p", NAN), ("min_p", -0.01), ("min_p", 1.5), ("min_p", INF),
    ("repetition_penalty", NAN), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("repetition_penalty", INF),
    ("presence_penalty", NAN), ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("presence_penalty", -INF),
    ("frequency_penalty", NAN), ("frequency_penalty", 3.0), ("frequency_penalty", INF),
    ("seed", -1), ("seed", 2**64), ("seed", 1.0), ("seed", True),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 0.5),
    ("ignore_eos", 1), ("skip_special_tokens", None),
    ("stop_token_ids", (-1,)), ("stop_token_ids", (1.0,)), ("stop_token_ids", 5),
    ("stop", ("",)), ("stop", (b"x",)), ("stop", "abc"),
    ("bad_words_ids", ((),)), ("bad_words_ids", ((1, -2),)), ("bad_words_ids", (3,)),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0), ("logprobs", True),
]


@pytest.mark.parametrize(("field_name", "value"), INVALID)
def test_invalid_value_raises_naming_the_field(field_name: str, value: object) -> None:
    params = SamplingParams(**{field_name: value})  # type: ignore[arg-type]
    with pytest.raises(SamplingParamsError) as info:
        params.validate()
    assert info.value.field == field_name
    assert str(info.value).startswith(f"{field_name}: ")


@pytest.mark.parametrize(("field_name", "value", "limit"), [
    ("max_tokens", 2**31, "2147483647"),
    ("top_p", 0.0, "(0.0, 1.0]"),
    ("presence_penalty", 2.5, "[-2.0, 2.0]"),
    ("logprobs", 21, "[0, 20]"),
    ("temperature", NAN, "finite"),
])
def test_message_names_the_limit(field_name: str, value: object, limit: str) -> None:
    with pytest.raises(SamplingParamsError, match=re.escape(limit)):
        SamplingParams(**{field_name: value}).validate()  # type: ignore[arg-type]


def test_token_ids_checked_against_vocab_size() -> None:
    SamplingParams(stop_token_ids=(99,), bad_words_ids=((1, 99),)).validate(vocab_size=100)
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(stop_token_ids=(100,)).validate(vocab_size=100)
    assert info.value.field == "stop_token_ids"
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(bad_words_ids=((1, 100),)).validate(vocab_size=100)
    assert info.value.field == "bad_words_ids"
    # Without a vocabulary only non-negativity is known.
    SamplingParams(stop_token_ids=(10**9,)).validate()


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(max_tokens=2**31 - 1, min_tokens=2**31 - 1),
    SamplingParams(temperature=0.0, top_k=10**9, top_p=1.0, min_p=1.0),
    SamplingParams(temperature=1e-30, top_p=1e-9, min_p=0.0),
    SamplingParams(repetition_penalty=1e-3, presence_penalty=-2.0, frequency_penalty=2.0),
    SamplingParams(seed=0), SamplingParams(seed=2**64 - 1),
    SamplingParams(stop=("\n", "###"), stop_token_ids=(0, 5), bad_words_ids=((3,), (1, 2))),
    SamplingParams(logprobs=0), SamplingParams(logprobs=20), SamplingParams(ignore_eos=True),
])
def test_valid_params_pass_and_return_self(params: SamplingParams) -> None:
    assert params.validate(vocab_size=1000) is params


def test_greedy_params() -> None:
    params = SamplingParams.greedy_params(8).validate()
    assert params.greedy and params.max_tokens == 8 and not params.ignore_eos


@pytest.mark.parametrize(("values", "field", "limit"), [
    ({"stop": ("x",) * (MAX_STOP_STRINGS + 1)}, "stop", f"limit of {MAX_STOP_STRINGS}"),
    ({"stop": ("y" * (MAX_STOP_CHARS // 2 + 1),) * 2}, "stop", f"characters in all exceed the limit of {MAX_STOP_CHARS}"),
    ({"bad_words_ids": ((1,),) * (MAX_BAD_WORDS + 1)}, "bad_words_ids", f"limit of {MAX_BAD_WORDS}"),
    ({"bad_words_ids": ((1,) * (MAX_BAD_WORD_TOKENS // 2 + 1),) * 2}, "bad_words_ids",
     f"token ids in all exceed the limit of {MAX_BAD_WORD_TOKENS}"),
    ({"stop_token_ids": (1,) * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids", f"limit of {MAX_STOP_TOKEN_IDS}"),
])
def test_list_fields_are_bounded(values: dict, field: str, limit: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**values).validate(vocab_size=1000)
    assert info.value.field == field and limit in str(info.value)


def test_list_count_is_checked_before_the_entries() -> None:
    """A million entries are refused by their count, without looking at (or type-checking) each one."""
    with pytest.raises(SamplingParamsError, match=f"1000000 entries exceed the limit of {MAX_STOP_STRINGS}"):
        SamplingParams(stop=(None,) * 1_000_000).validate()   # type: ignore[arg-type]


def test_bans_that_leave_no_token_are_refused() -> None:
    """Every token banned (today's sampler would silently emit token 0): refused at admission."""
    vocab = 8
    every_token = tuple((t,) for t in range(vocab))
    with pytest.raises(SamplingParamsError, match="ban all 8 tokens of the vocabulary") as info:
        SamplingParams(bad_words_ids=every_token).validate(vocab_size=vocab)
    assert info.value.field == "bad_words_ids"
    SamplingParams(bad_words_ids=every_token[:-1]).validate(vocab_size=vocab)      # one token left: fine
    # the last allowed tokens are the stop / EOS tokens, banned while min_tokens are due
    rest = SamplingParams(bad_words_ids=every_token[:-2], stop_token_ids=(6,), min_tokens=2)
    with pytest.raises(SamplingParamsError, match="during min_tokens"):
        rest.validate(vocab_size=vocab, eos_token_ids=(7,))
    SamplingParams(bad_words_ids=every_token[:-2], stop_token_ids=(6,), min_tokens=2,
                   ignore_eos=True).validate(vocab_size=vocab, eos_token_ids=(7,))   # EOS not banned then
    SamplingParams(bad_words_ids=every_token[:-2], stop_token_ids=(6,)).validate(vocab_size=vocab, eos_token_ids=(7,))
