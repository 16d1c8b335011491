"""The engine's door (runtime/core/admission.py): every refusal names the field and the limit, in one place."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.core.admission import AdmissionLimits, RequestRejectedError, check_request
from runtime.core.request import EngineRequest, MultimodalSpan
from runtime.errors import FieldError
from runtime.multimodal.processor import MultimodalInputs
from runtime.sampling_params import SamplingParams, SamplingParamsError

# max_input_len above max_seq_len only so that each limit can be reached on its own.
LIMITS = AdmissionLimits(vocab_size=100, max_input_len=256, max_seq_len=128, num_kv_blocks=16, tokens_per_block=4)


def nothing_in_flight(request_id: str) -> bool:
    return False


def request(ids: list[int], max_tokens: int = 4, **params: object) -> EngineRequest:
    return EngineRequest("r", ids, SamplingParams(max_tokens=max_tokens, **params))  # type: ignore[arg-type]


@pytest.mark.parametrize("ids, max_tokens, error, field_name, message", [
    ([], 4, RequestRejectedError, "prompt_token_ids", "prompt is empty (needs >= 1 token)"),
    ([1] * 129, 1, RequestRejectedError, "prompt_token_ids", "prompt (129) exceeds max_seq_len (128)"),
    ([1] * 100, 50, RequestRejectedError, "max_tokens",
     "prompt (100) + max_tokens (50) exceeds max_seq_len (128)"),
    ([1] * 100, 0, SamplingParamsError, "max_tokens", "must be in [1, 2147483647], got 0"),
    ([1] * 70, 4, RequestRejectedError, "prompt_token_ids",
     "prompt (70) needs more blocks than the whole KV cache (16 blocks of 4 tokens)"),
    ([1] * 60, 8, RequestRejectedError, "max_tokens",
     "prompt (60) + max_tokens (8) needs 17 blocks, more than the whole KV cache (16 blocks of 4 tokens)"),
    ([1, 100], 4, RequestRejectedError, "prompt_token_ids",
     "token id 100 at index 1 is outside the vocabulary [0, 100)"),
    ([-1], 4, RequestRejectedError, "prompt_token_ids", "token id -1 at index 0 is outside the vocabulary"),
])
def test_refusals_name_the_field_and_the_limit(ids: list[int], max_tokens: int, error: type[FieldError],
                                               field_name: str, message: str) -> None:
    with pytest.raises(error) as info:
        check_request(request(ids, max_tokens), LIMITS, nothing_in_flight)
    assert info.value.field == field_name
    assert str(info.value).startswith(f"{field_name}: {message}")


def test_max_input_len_and_parameter_token_ids_are_checked_against_the_engine() -> None:
    short_inputs = AdmissionLimits(100, 8, 128, 16, 4)
    with pytest.raises(RequestRejectedError,
                       match=r"^prompt_token_ids: prompt \(9 tokens\) exceeds max_input_len \(8\)$"):
        check_request(request([1] * 9), short_inputs, nothing_in_flight)
    with pytest.raises(SamplingParamsError, match=r"^stop_token_ids: token id at index 0 must be in \[0, 99\]"):
        check_request(request([1], stop_token_ids=(100,)), LIMITS, nothing_in_flight)


def test_an_id_in_flight_is_refused() -> None:
    with pytest.raises(RequestRejectedError, match=r"^request_id: 'r' is already queued or running$"):
        check_request(request([1, 2]), LIMITS, lambda request_id: request_id == "r")


def test_images_for_a_text_only_engine_are_refused() -> None:
    spans = (MultimodalSpan(0, 2, "cat"),)
    mm = MultimodalInputs((), spans, np.zeros((3, 2), dtype=np.int64), 0)
    with pytest.raises(FieldError) as info:
        check_request(EngineRequest("r", [5, 5, 6], SamplingParams(), multimodal=mm), LIMITS, nothing_in_flight)
    assert info.value.field == "multimodal"


def test_a_servable_request_passes_with_its_validated_parameters() -> None:
    params = SamplingParams(max_tokens=64 - 4)
    admitted = check_request(EngineRequest("r", list(range(4)), params), LIMITS, nothing_in_flight)
    assert admitted is params          # exactly fills the 16 blocks of 4 tokens


def test_bans_that_with_eos_cover_the_vocabulary_are_refused_at_the_door() -> None:
    with_eos = AdmissionLimits(100, 256, 128, 16, 4, eos_token_ids=(99,))
    bad_words = tuple((t,) for t in range(99))          # every token but EOS, and EOS is banned during min_tokens
    params = SamplingParams(bad_words_ids=bad_words, min_tokens=1)
    with pytest.raises(SamplingParamsError) as info:
        check_request(EngineRequest("r", [1], params), with_eos, nothing_in_flight)
    assert info.value.field == "bad_words_ids"
    assert check_request(EngineRequest("r", [1], params), LIMITS, nothing_in_flight) is params   # EOS unknown
