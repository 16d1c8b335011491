"""KServe v2 tensor decoding (grpc_service/triton_tensors.py) and the TensorRT-LLM parameters' meaning
(grpc_service/triton_params.py), called directly as the service calls them, without a server.

Requests are built as tritonclient builds them (raw contents; BYTES serialised by tritonclient.utils),
decoded against the served schema (triton_schema.default_configs), then read into a TritonGeneration
by a ServedModel over the tiny engine (its real tokenizer; no request is generated). Every refusal
must name the tensor the client sent.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from grpc_service.engine_host import ServedModel, StartedEngine
from grpc_service.metrics import ServerMetrics
from grpc_service.triton_params import TritonGeneration, ensemble_request, ensemble_visuals, tensorrt_llm_request
from grpc_service.triton_schema import ENSEMBLE, TENSORRT_LLM, RepositoryNames, model_config
from grpc_service.triton_tensors import MAX_ELEMENTS, OutputTensor, decode_inputs, encode_response, requested_outputs
from runtime.config import EngineConfig
from runtime.errors import FieldError

ENSEMBLE_CONFIG = model_config(ENSEMBLE, RepositoryNames(), 4, "engine")
LLM_CONFIG = model_config(TENSORRT_LLM, RepositoryNames(), 4, "engine")
NUMPY = {"INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_,
         "UINT8": np.uint8, "FP16": np.float16}
Tensor = tuple[str, str, object]        # (name, KServe datatype, value: scalar, list, or numpy array)


def raw_request(*tensors: Tensor) -> pb.ModelInferRequest:
    """Every input raw, batch dimension 1 added to scalars and lists (as tritonclient clients send them)."""
    request = pb.ModelInferRequest(model_name="ensemble", id="r1")
    for name, datatype, value in tensors:
        array = value if isinstance(value, np.ndarray) else \
            np.array([value if isinstance(value, list) else [value]], dtype=object if datatype == "BYTES"
                     else NUMPY[datatype])
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        data = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
        request.raw_input_contents.append(data)
    return request


def refusal(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(FieldError) as info:
        call()
    return info.value.field, str(info.value)


TEXT = ("text_input", "BYTES", "Once upon a time".encode())
MAX_TOKENS = ("max_tokens", "INT32", 4)


# ------------------------------------------------------------------ triton_tensors: decode_inputs

def test_raw_inputs_decode_to_named_arrays_with_their_shapes() -> None:
    arrays = decode_inputs(raw_request(TEXT, MAX_TOKENS, ("seed", "UINT64", 2 ** 63 + 5),
                                       ("stop_words", "BYTES", [b"\n\n", "é".encode(), b""]),
                                       ("temperature", "FP32", 0.5), ("stream", "BOOL", True)), ENSEMBLE_CONFIG)
    assert arrays["text_input"].shape == (1, 1) and arrays["text_input"][0, 0] == b"Once upon a time"
    assert arrays["max_tokens"].dtype == np.int32 and arrays["max_tokens"].tolist() == [[4]]
    assert arrays["seed"].dtype == np.uint64 and int(arrays["seed"][0, 0]) == 2 ** 63 + 5
    assert arrays["stop_words"].shape == (1, 3) and arrays["stop_words"][0].tolist() == [b"\n\n", "é".encode(), b""]
    assert arrays["temperature"][0, 0] == np.float32(0.5) and bool(arrays["stream"][0, 0])


def test_typed_contents_decode_like_raw() -> None:
    request = pb.ModelInferRequest(model_name="ensemble")
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    text.contents.bytes_contents.append(b"hi")
    tokens = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    tokens.contents.int_contents.append(7)
    arrays = decode_inputs(request, ENSEMBLE_CONFIG)
    assert arrays["text_input"][0, 0] == b"hi" and arrays["max_tokens"].tolist() == [[7]]

    tokens.contents.int_contents.append(8)
    assert refusal(lambda: decode_inputs(request, ENSEMBLE_CONFIG)) == (
        "max_tokens", "max_tokens: contents hold 2 element(s), the shape says 1")


@pytest.mark.parametrize("tensors,field,message", [
    ([TEXT, ("max_tokens", "INT64", 4)], "max_tokens", "datatype is 'INT64', model 'ensemble' expects 'INT32'"),
    ([TEXT, ("max_tokens", "INT32", np.array([[4, 5]], dtype=np.int32))], "max_tokens",
     "shape [1, 2] does not match the model's [-1,1]"),
    ([TEXT, ("max_tokens", "INT32", np.array([4], dtype=np.int32))], "max_tokens",
     "shape [1] does not match the model's [-1,1]"),
    ([TEXT, ("max_tokens", "INT32", np.array([[4], [5]], dtype=np.int32))], "max_tokens", "batch dimension is 2"),
    ([TEXT], "max_tokens", "required input tensor is missing for model 'ensemble'"),
    ([TEXT, MAX_TOKENS, TEXT], "text_input", "input tensor given more than once"),
    ([TEXT, MAX_TOKENS, ("input_ids", "INT32", 3)], "input_ids", "unexpected input tensor for model 'ensemble'"),
    ([TEXT, MAX_TOKENS, ("image_bytes_input", "UINT8", np.zeros((1, 1, 2, 2, 3), np.uint8))], "image_bytes_input",
     "unexpected input tensor"),                             # a text engine's ensemble has no image inputs
])
def test_tensor_refusals_name_the_tensor(tensors: list[Tensor], field: str, message: str) -> None:
    got_field, got_message = refusal(lambda: decode_inputs(raw_request(*tensors), ENSEMBLE_CONFIG))
    assert got_field == field and message in got_message, got_message


def test_raw_byte_size_must_match_the_shape() -> None:
    request = raw_request(TEXT, MAX_TOKENS)
    request.raw_input_contents[1] = np.array([4, 0], dtype=np.int32).tobytes()
    assert refusal(lambda: decode_inputs(request, ENSEMBLE_CONFIG)) == (
        "max_tokens", "max_tokens: raw byte size 8 does not match the shape: 1 x INT32 is 4 bytes")
    del request.raw_input_contents[1]
    field, message = refusal(lambda: decode_inputs(request, ENSEMBLE_CONFIG))
    assert field == "raw_input_contents" and "holds 1 entries for 2 inputs" in message


@pytest.mark.parametrize("raw,message", [
    (b"\x05\x00\x00\x00abc", "BYTES element 0 claims 5 bytes, only 3 remain"),
    (b"\x02\x00", "raw byte size 2 does not match 1 BYTES element(s)"),
    (b"\x01\x00\x00\x00a\x01\x00\x00\x00b", "raw byte size 10 does not match 1 BYTES element(s)"),
    (b"", "holds 0 BYTES element(s), the shape says 1"),
])
def test_malformed_bytes_elements_are_refused(raw: bytes, message: str) -> None:
    request = raw_request(TEXT, MAX_TOKENS)
    request.raw_input_contents[0] = raw
    field, got = refusal(lambda: decode_inputs(request, ENSEMBLE_CONFIG))
    assert field == "text_input" and message in got, got


def test_empty_and_binary_bytes_elements_decode() -> None:
    request = raw_request(TEXT, MAX_TOKENS, ("bad_words", "BYTES", [b"", b"\xff\x00", b"ok"]))
    assert decode_inputs(request, ENSEMBLE_CONFIG)["bad_words"][0].tolist() == [b"", b"\xff\x00", b"ok"]


def test_forged_shapes_are_refused_before_allocation() -> None:
    huge = pb.ModelInferRequest(model_name="ensemble")
    huge.inputs.add(name="stop_words", datatype="BYTES", shape=[1, MAX_ELEMENTS + 1])
    assert refusal(lambda: decode_inputs(huge, ENSEMBLE_CONFIG))[1] == (
        f"stop_words: shape [1, {MAX_ELEMENTS + 1}] holds more than {MAX_ELEMENTS} elements")
    huge.inputs[0].shape[1] = -3
    assert "has a negative dimension" in refusal(lambda: decode_inputs(huge, ENSEMBLE_CONFIG))[1]


def test_shared_memory_and_contents_only_limits() -> None:
    request = raw_request(TEXT, MAX_TOKENS)
    request.inputs[1].parameters["shared_memory_region"].string_param = "region0"
    assert refusal(lambda: decode_inputs(request, ENSEMBLE_CONFIG))[0] == "max_tokens"

    config = mc.ModelConfig(name="m", max_batch_size=0)
    config.input.add(name="half", data_type=mc.TYPE_FP16, dims=[1])
    config.input.add(name="small", data_type=mc.TYPE_INT8, dims=[1], optional=True)
    half = pb.ModelInferRequest()
    half.inputs.add(name="half", datatype="FP16", shape=[1])
    assert "must be sent in raw_input_contents" in refusal(lambda: decode_inputs(half, config))[1]
    assert decode_inputs(raw_request(("half", "FP16", np.array([1.5], np.float16))), config)["half"][0] == 1.5
    small = pb.ModelInferRequest()
    small.inputs.add(name="small", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    small.inputs.add(name="half", datatype="FP16", shape=[1])
    assert refusal(lambda: decode_inputs(small, config)) == ("small", "small: a value does not fit INT8")


def test_requested_outputs_and_response_encoding() -> None:
    request = pb.ModelInferRequest()
    for name in ("cum_log_probs", "text_output"):
        request.outputs.add(name=name)
    assert requested_outputs(request, ENSEMBLE_CONFIG) == ["cum_log_probs", "text_output"]
    request.outputs.add(name="text_output")
    assert refusal(lambda: requested_outputs(request, ENSEMBLE_CONFIG))[1] == (
        "text_output: requested output given more than once")
    unknown = pb.ModelInferRequest()
    unknown.outputs.add(name="logits")
    assert refusal(lambda: requested_outputs(unknown, ENSEMBLE_CONFIG))[0] == "logits"

    text = np.array([["a", "é€".encode(), b""]], dtype=object)
    response = encode_response(ENSEMBLE_CONFIG, "r1", [OutputTensor("text_output", "BYTES", text),
                                                       OutputTensor("batch_index", "INT32", np.array([[0]]))], True)
    assert response.id == "r1" and [o.name for o in response.outputs] == ["text_output", "batch_index"]
    assert list(response.outputs[0].shape) == [1, 3]
    assert deserialize_bytes_tensor(response.raw_output_contents[0]).tolist() == [b"a", "é€".encode(), b""]
    assert np.frombuffer(response.raw_output_contents[1], np.int32).tolist() == [0]
    assert response.parameters["triton_final_response"].bool_param is True
    assert "triton_final_response" not in encode_response(ENSEMBLE_CONFIG, "r1", [], None).parameters


# ------------------------------------------------------------------ triton_params: what the values mean

@pytest.fixture(scope="module")
def model(build_tiny: Callable[..., Path]) -> Iterator[ServedModel]:
    started = StartedEngine.start(build_tiny("tiny-qwen2"), EngineConfig(), in_process=True)   # no generation here
    served = ServedModel(started, 4, ServerMetrics())
    yield served
    served.shutdown()


def ensemble(model: ServedModel, *tensors: Tensor) -> TritonGeneration:
    arrays = decode_inputs(raw_request(*tensors), ENSEMBLE_CONFIG)
    generation, _ = asyncio.run(ensemble_request(arrays, model))
    return generation


def llm(model: ServedModel, *tensors: Tensor) -> TritonGeneration:
    return tensorrt_llm_request(decode_inputs(raw_request(*tensors), LLM_CONFIG), model)


def test_ensemble_prompt_words_and_flags(model: ServedModel) -> None:
    g = ensemble(model, TEXT, MAX_TOKENS, ("end_id", "INT32", 7), ("stop_words", "BYTES", [b"", b"The end"]),
                 ("bad_words", "BYTES", [b"", b" dragon"]), ("stream", "BOOL", True),
                 ("exclude_input_in_output", "BOOL", True), ("return_log_probs", "BOOL", True))
    assert g.prompt_ids == model.encode_text("Once upon a time") and g.prompt_ids
    assert g.params.max_tokens == 4 and g.params.stop_token_ids == (7,) and g.params.stop == ("The end",)
    assert g.params.bad_words_ids == (tuple(model.encode_text(" dragon")),)
    assert g.stream and g.exclude_input_in_output and g.return_log_probs and g.params.logprobs == 0
    plain = ensemble(model, TEXT, MAX_TOKENS)
    assert not (plain.stream or plain.exclude_input_in_output or plain.return_log_probs)
    assert plain.params.logprobs is None and plain.params.stop == () and plain.params.stop_token_ids == ()


@pytest.mark.parametrize("tensors,temperature,top_k,top_p", [
    ([], 0.0, 0, 1.0),                                                       # neither top_k nor top_p: greedy
    ([("top_k", "INT32", 0), ("top_p", "FP32", 0.0)], 0.0, 0, 1.0),
    ([("top_k", "INT32", 1), ("temperature", "FP32", 0.9)], 0.0, 0, 1.0),    # top_k 1 is greedy
    ([("top_p", "FP32", 0.9), ("temperature", "FP32", 0.0)], 0.0, 0, 1.0),   # temperature 0 is greedy
    ([("top_k", "INT32", 5)], 1.0, 5, 1.0),                                  # sampling, default temperature 1
    ([("top_p", "FP32", 0.8), ("temperature", "FP32", 0.7)], 0.7, 0, 0.8),
])
def test_greedy_unless_the_client_turns_sampling_on(model: ServedModel, tensors: list[Tensor], temperature: float,
                                                    top_k: int, top_p: float) -> None:
    params = ensemble(model, TEXT, MAX_TOKENS, *tensors).params
    assert (params.temperature, params.top_k, params.top_p) == pytest.approx((temperature, top_k, top_p))


def test_old_and_new_names_of_min_tokens_and_seed(model: ServedModel) -> None:
    assert ensemble(model, TEXT, MAX_TOKENS, ("min_length", "INT32", 3)).params.min_tokens == 3
    assert ensemble(model, TEXT, MAX_TOKENS, ("min_tokens", "INT32", 2)).params.min_tokens == 2
    assert ensemble(model, TEXT, MAX_TOKENS, ("min_tokens", "INT32", 2), ("min_length", "INT32", 2)) \
        .params.min_tokens == 2
    assert ensemble(model, TEXT, MAX_TOKENS, ("random_seed", "UINT64", 11)).params.seed == 11
    assert ensemble(model, TEXT, MAX_TOKENS, ("seed", "UINT64", 12)).params.seed == 12
    assert refusal(lambda: ensemble(model, TEXT, MAX_TOKENS, ("min_tokens", "INT32", 2),
                                    ("min_length", "INT32", 3))) == (
        "min_length", "min_length: is the older name of min_tokens; give one of them (got 3 and 2)")
    assert refusal(lambda: ensemble(model, TEXT, MAX_TOKENS, ("seed", "UINT64", 1),
                                    ("random_seed", "UINT64", 2)))[0] == "random_seed"


@pytest.mark.parametrize("tensors,field,message", [
    ([("max_tokens", "INT32", 0)], "max_tokens", "must be in [1, 2147483647], got 0"),
    ([("max_tokens", "INT32", -5)], "max_tokens", "must be in [1, 2147483647], got -5"),
    ([MAX_TOKENS, ("top_p", "FP32", 1.5)], "top_p", "must be in [0.0, 1.0], got 1.5"),
    ([MAX_TOKENS, ("top_p", "FP32", math.nan)], "top_p", "must be finite"),
    ([MAX_TOKENS, ("temperature", "FP32", math.inf)], "temperature", "must be finite"),
    ([MAX_TOKENS, ("temperature", "FP32", -0.5)], "temperature", "must be in [0.0, inf]"),
    ([MAX_TOKENS, ("top_k", "INT32", -1)], "top_k", "must be in [0, inf]"),
    ([MAX_TOKENS, ("length_penalty", "FP32", math.nan)], "length_penalty", "must be finite"),
    ([MAX_TOKENS, ("beam_width", "INT32", 2)], "beam_width", "only 1 is supported"),
    ([MAX_TOKENS, ("num_return_sequences", "INT32", 3)], "num_return_sequences", "only 1 is supported"),
    ([MAX_TOKENS, ("return_context_logits", "BOOL", True)], "return_context_logits", "not supported"),
    ([MAX_TOKENS, ("return_generation_logits", "BOOL", True)], "return_generation_logits", "not supported"),
    ([MAX_TOKENS, ("stop_words", "BYTES", [b"ok", b"\xc3("])], "stop_words", "is not valid UTF-8 (byte 0)"),
])
def test_ensemble_refusals_name_the_tensor(model: ServedModel, tensors: list[Tensor], field: str,
                                          message: str) -> None:
    got_field, got_message = refusal(lambda: ensemble(model, TEXT, *tensors))
    assert got_field == field and message in got_message, got_message


def test_invalid_utf8_prompt_names_text_input(model: ServedModel) -> None:
    assert refusal(lambda: ensemble(model, ("text_input", "BYTES", b"ab\xffcd"), MAX_TOKENS)) == (
        "text_input", "text_input: is not valid UTF-8 (byte 2)")


def test_image_tensors_are_judged_before_decoding() -> None:
    both = {"image_bytes_input": np.zeros((1, 1, 2, 2, 3), np.uint8),
            "image_url_input": np.array([[b"data:,x"]], dtype=object)}
    assert refusal(lambda: ensemble_visuals(both))[0] == "image_url_input"
    empty = {"image_bytes_input": np.zeros((1, 0, 0, 0, 3), np.uint8)}
    assert ensemble_visuals(empty) == ([], [])              # an empty tensor counts as absent
    urls = ensemble_visuals({"image_url_input": np.array([[b"data:,a", b"file:///b.png"]], dtype=object)})[0]
    assert [(s.field, s.url) for s in urls] == [("image_url_input[0]", "data:,a"),
                                                ("image_url_input[1]", "file:///b.png")]


def word_list(words: list[list[int]]) -> np.ndarray:
    """The backend's [1, 2, L] layout: ids, then end offsets padded with -1."""
    ids = [t for w in words for t in w]
    offsets = np.cumsum([len(w) for w in words]).tolist()
    offsets += [-1] * (len(ids) - len(offsets))
    return np.array([[ids, offsets]], dtype=np.int32)


def test_tensorrt_llm_vocabulary(model: ServedModel) -> None:
    two = model.encode_text(" the end")
    assert len(two) >= 2
    g = llm(model, ("input_ids", "INT32", np.array([[5, 6, 7, 8]], np.int32)), ("input_lengths", "INT32", 3),
            ("request_output_len", "INT32", 6), ("end_id", "INT32", 2), ("streaming", "BOOL", True),
            ("stop_words_list", "INT32", word_list([[9], two])), ("bad_words_list", "INT32", word_list([[10, 11]])),
            ("runtime_top_k", "INT32", 4))
    assert g.prompt_ids == [5, 6, 7] and g.stream and g.params.max_tokens == 6
    assert g.params.stop_token_ids == (9, 2) and g.params.stop == (model.decode(two, skip_special_tokens=False),)
    assert g.params.bad_words_ids == ((10, 11),) and g.params.top_k == 4


@pytest.mark.parametrize("tensors,field,message", [
    ([("input_lengths", "INT32", 5)], "input_lengths", "must be in [1, 4] (the input_ids given), got 5"),
    ([("input_lengths", "INT32", 0)], "input_lengths", "must be in [1, 4]"),
    ([("input_lengths", "INT32", 4), ("request_output_len", "INT32", 0)], "request_output_len",
     "must be in [1, 2147483647], got 0"),
    ([("input_lengths", "INT32", 4), ("runtime_top_p", "FP32", 2.0)], "runtime_top_p", "must be in [0.0, 1.0]"),
    ([("input_lengths", "INT32", 4), ("stop_words_list", "INT32", np.array([[[9, 3], [2, 1]]], np.int32))],
     "stop_words_list", "offsets must increase within [1, 2], got 1 after 2"),
    ([("input_lengths", "INT32", 4), ("bad_words_list", "INT32", np.array([[[10**6], [1]]], np.int32))],
     "bad_words_list", "is outside the vocabulary"),
])
def test_tensorrt_llm_refusals_name_the_tensor(model: ServedModel, tensors: list[Tensor], field: str,
                                              message: str) -> None:
    ids = ("input_ids", "INT32", np.array([[5, 6, 7, 8]], np.int32))
    extra = [] if any(t[0] == "request_output_len" for t in tensors) else [("request_output_len", "INT32", 3)]
    got_field, got_message = refusal(lambda: llm(model, ids, *tensors, *extra))
    assert got_field == field and message in got_message, got_message

