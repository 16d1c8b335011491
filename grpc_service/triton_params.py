"""What the TensorRT-LLM backend's input tensors mean, as a `TritonGeneration` for the engine.

What it is for: reading the decoded tensors of an `ensemble` or `tensorrt_llm`
request (both tensor vocabularies, including the older names `min_length` and
`random_seed`) into a prompt, `SamplingParams` and the response flags, with
TensorRT-LLM's semantics:

* sampling is greedy unless the client turns it on: with neither top_k nor
  top_p given (or both 0), or top_k = 1, or temperature = 0, the engine takes
  the argmax; otherwise it samples with the given temperature (default 1.0),
  top_k (0 = off) and top_p (0 = off);
* `end_id` is an extra stop token; `stop_words` are stop strings, `bad_words`
  are tokenized and never generated (empty strings, which clients often send,
  are ignored); the `tensorrt_llm` word lists use the backend's [2, L] layout
  (token ids, then end offsets padded with -1);
* streaming sends only new tokens; `exclude_input_in_output` (default false)
  applies to non-streaming responses, which then begin with the prompt;
* beam search, several return sequences and context / generation logits are
  refused with INVALID_ARGUMENT naming the tensor;
* a vision-language ensemble also reads the multimodal ensemble's
  `image_bytes_input` (uint8 pixels, or encoded images as [N, 1, 1, bytes]),
  `image_url_input` (one URL per image) and `video_bytes_input` (one video's
  frames); `text_input` then holds the prompt with one vision block per image
  (or none: one block per image goes first).

Every error names the tensor the client sent (SamplingParams' own field names
are translated back). Not for: tensor decoding (triton_tensors.py) or
responses (triton_models.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from grpc_service.engine_host import ServedModel
from grpc_service.errors import InvalidArgument
from grpc_service.guides import triton_guide
from grpc_service.visual_inputs import (
    FieldNames,
    ImageSource,
    VideoSource,
    pixel_images,
    pixel_video,
)
from runtime.multimodal.processor import MultimodalInputs
from runtime.sampling_params import (
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    MAX_STOP_STRINGS,
    SamplingParams,
    SamplingParamsError,
)

# SamplingParams field -> tensor name, per vocabulary
ENSEMBLE_NAMES = {"max_tokens": "max_tokens", "top_k": "top_k", "top_p": "top_p", "stop_token_ids": "end_id",
                  "stop": "stop_words", "bad_words_ids": "bad_words", "prompt_token_ids": "text_input"}
TENSORRT_LLM_NAMES = {"max_tokens": "request_output_len", "top_k": "runtime_top_k", "top_p": "runtime_top_p",
                      "stop_token_ids": "end_id", "stop": "stop_words_list", "bad_words_ids": "bad_words_list",
                      "prompt_token_ids": "input_ids"}


@dataclass(frozen=True, slots=True)
class TritonGeneration:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool
    return_log_probs: bool
    return_perf_metrics: bool
    multimodal: MultimodalInputs | None = None


async def ensemble_request(arrays: Mapping[str, np.ndarray],
                           model: ServedModel) -> tuple[TritonGeneration, str]:
    """The generation an `ensemble` request asks for, and its prompt text. Images and videos are
    decoded (off the event loop) only after every other tensor has been judged."""
    text = decode_utf8("text_input", arrays["text_input"].reshape(-1)[0])
    images, videos = ensemble_visuals(arrays)
    stop = tuple(decode_utf8("stop_words", w) for w in _bytes_list(arrays.get("stop_words")))
    bad_texts = [decode_utf8("bad_words", w) for w in _bytes_list(arrays.get("bad_words"))]
    # tokenizing is the costly part: off the event loop, bad words' size checked first (tokenize_words);
    # with images, every other tensor is judged (prompt still empty) before any image is decoded
    bad, prompt_ids = await model.off_loop(_tokenize, model, bad_texts, "" if images or videos else text)
    generation = _generation(arrays, ENSEMBLE_NAMES, prompt_ids, tuple(s for s in stop if s), bad, "stream",
                             model.limits.vocab_size, eos_token_ids=model.limits.eos_token_ids)
    if not (images or videos):
        return generation, text
    image_field = images[0].field.partition("[")[0] if images else "video_bytes_input"
    aliases = {"text": "text_input", "images": image_field, "videos": "video_bytes_input",
               "videos[0]": "video_bytes_input", **{f"images[{i}]": src.field for i, src in enumerate(images)}}
    prompt_ids, multimodal = await model.encode_visual_text(text, images, videos, FieldNames(aliases), image_field)
    return replace(generation, prompt_ids=prompt_ids, multimodal=multimodal), text


def _tokenize(model: ServedModel, bad_words: list[str], prompt: str) -> tuple[tuple[tuple[int, ...], ...], list[int]]:
    return model.tokenize_words(bad_words), model.encode_text(prompt) if prompt else []


def ensemble_visuals(arrays: Mapping[str, np.ndarray]) -> tuple[list[ImageSource], list[VideoSource]]:
    """The images and video a multimodal-ensemble request carries (empty tensors count as absent)."""
    present = {name for name in ("image_bytes_input", "image_url_input", "video_bytes_input")
               if name in arrays and arrays[name].size}
    if {"image_bytes_input", "image_url_input"} <= present:
        raise InvalidArgument("image_url_input", "give image_bytes_input or image_url_input, not both")
    images: list[ImageSource] = []
    if "image_bytes_input" in present:
        images = pixel_images(arrays["image_bytes_input"][0], "image_bytes_input")
    elif "image_url_input" in present:
        images = [ImageSource(f"image_url_input[{i}]", url=decode_utf8(f"image_url_input[{i}]", url))
                  for i, url in enumerate(arrays["image_url_input"].reshape(-1))]
    videos = [pixel_video(arrays["video_bytes_input"][0], "video_bytes_input")] if "video_bytes_input" in present \
        else []
    return images, videos


def tensorrt_llm_request(arrays: Mapping[str, np.ndarray], model: ServedModel) -> TritonGeneration:
    ids_given = arrays["input_ids"].reshape(-1)
    length = scalar_int(arrays, "input_lengths")
    if length is None or not 1 <= length <= ids_given.size:
        raise InvalidArgument("input_lengths", f"must be in [1, {ids_given.size}] (the input_ids given), got {length}")
    if length > model.limits.max_input_len:         # before turning millions of ids into Python ints
        raise InvalidArgument("input_ids", f"prompt ({length} tokens) exceeds max_input_len "
                                           f"({model.limits.max_input_len})")
    prompt_ids = [int(t) for t in ids_given[:length]]
    stop_words = word_list(arrays.get("stop_words_list"), "stop_words_list", MAX_STOP_STRINGS)
    bad_words = word_list(arrays.get("bad_words_list"), "bad_words_list", MAX_BAD_WORDS)
    for words, name in ((stop_words, "stop_words_list"), (bad_words, "bad_words_list")):
        model.check_token_ids([t for w in words for t in w], name)
    single = tuple(w[0] for w in stop_words if len(w) == 1)
    multi = tuple(model.decode(w, skip_special_tokens=False) for w in stop_words if len(w) > 1)
    generation = _generation(arrays, TENSORRT_LLM_NAMES, prompt_ids, tuple(s for s in multi if s), bad_words,
                             "streaming", model.limits.vocab_size, extra_stop_ids=single,
                             eos_token_ids=model.limits.eos_token_ids)
    return generation


def _generation(arrays: Mapping[str, np.ndarray], names: Mapping[str, str], prompt_ids: list[int],
                stop: tuple[str, ...], bad_words: tuple[tuple[int, ...], ...], stream_name: str,
                vocab_size: int, extra_stop_ids: tuple[int, ...] = (), eos_token_ids: tuple[int, ...] = (),
                multimodal: MultimodalInputs | None = None) -> TritonGeneration:
    for name in ("beam_width", "num_return_sequences"):
        value = scalar_int(arrays, name)
        if value is not None and value != 1:
            raise InvalidArgument(name, f"only 1 is supported (no beam search / multiple sequences), got {value}")
    for name in ("return_context_logits", "return_generation_logits"):
        if scalar_bool(arrays, name):
            raise InvalidArgument(name, "returning logits is not supported; set it to false")
    max_tokens = scalar_int(arrays, names["max_tokens"])
    top_k = scalar_int(arrays, names["top_k"])
    top_p = scalar_float(arrays, names["top_p"])
    temperature = scalar_float(arrays, "temperature")
    end_id = scalar_int(arrays, "end_id")
    _check_range(names["top_k"], top_k, 0, None)
    _check_range(names["top_p"], top_p, 0.0, 1.0)
    _check_range("temperature", temperature, 0.0, None)
    for name in ("length_penalty", "len_penalty"):      # beam search only: checked, then unused
        _check_range(name, scalar_float(arrays, name), None, None)
    greedy = (not top_k and not top_p) or top_k == 1 or temperature == 0.0
    values: dict[str, object] = {
        "max_tokens": max_tokens,
        "temperature": 0.0 if greedy else (1.0 if temperature is None else temperature),
        "top_k": 0 if greedy or top_k is None else top_k,
        "top_p": 1.0 if greedy or not top_p else top_p,
        "min_tokens": _one_of(arrays, "min_tokens", "min_length"),
        "seed": _one_of(arrays, "seed", "random_seed"),
        "stop_token_ids": extra_stop_ids + (() if end_id is None else (end_id,)),
        "stop": stop,
        "bad_words_ids": bad_words,
        "logprobs": 0 if scalar_bool(arrays, "return_log_probs") else None,
        "guided_decoding": triton_guide(arrays),
    }
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        values[name] = scalar_float(arrays, name)
    try:
        params = SamplingParams(**{k: v for k, v in values.items() if v is not None}).validate(  # type: ignore[arg-type]
            vocab_size, eos_token_ids)
    except SamplingParamsError as exc:
        raise tensor_error(exc, names) from None
    return TritonGeneration(prompt_ids, params, bool(scalar_bool(arrays, stream_name)),
                            bool(scalar_bool(arrays, "exclude_input_in_output")),
                            bool(scalar_bool(arrays, "return_log_probs")),
                            bool(scalar_bool(arrays, "return_perf_metrics")), multimodal)


def tensor_error(exc: ValueError, names: Mapping[str, str]) -> InvalidArgument:
    """A runtime refusal ("field: limit"), re-addressed to the tensor the client sent."""
    field = str(getattr(exc, "field", ""))
    return InvalidArgument(names.get(field, field), str(exc).split(": ", 1)[-1])


def scalar_int(arrays: Mapping[str, np.ndarray], name: str) -> int | None:
    array = arrays.get(name)
    return None if array is None or array.size == 0 else int(array.reshape(-1)[0])


def scalar_float(arrays: Mapping[str, np.ndarray], name: str) -> float | None:
    array = arrays.get(name)
    return None if array is None or array.size == 0 else float(array.reshape(-1)[0])


def scalar_bool(arrays: Mapping[str, np.ndarray], name: str) -> bool | None:
    array = arrays.get(name)
    return None if array is None or array.size == 0 else bool(array.reshape(-1)[0])


def decode_utf8(name: str, data: object) -> str:
    raw = data if isinstance(data, bytes) else str(data).encode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(name, f"is not valid UTF-8 (byte {exc.start})") from None


def word_list(array: np.ndarray | None, name: str, max_words: int) -> tuple[tuple[int, ...], ...]:
    """The backend's [1, 2, L] word-list layout: ids, then end offsets padded with -1 (L at most
    MAX_BAD_WORD_TOKENS, at most `max_words` words)."""
    if array is None or array.size == 0:
        return ()
    ids, offsets = array.reshape(2, -1)
    if ids.size > MAX_BAD_WORD_TOKENS:
        raise InvalidArgument(name, f"{ids.size} token ids exceed the limit of {MAX_BAD_WORD_TOKENS}")
    if int(np.count_nonzero(offsets >= 0)) > max_words:
        raise InvalidArgument(name, f"{int(np.count_nonzero(offsets >= 0))} words exceed the limit of {max_words}")
    words: list[tuple[int, ...]] = []
    start = 0
    for end in (int(o) for o in offsets):
        if end < 0:
            break
        if not start < end <= len(ids):
            raise InvalidArgument(name, f"offsets must increase within [1, {len(ids)}], got {end} after {start}")
        words.append(tuple(int(t) for t in ids[start:end]))
        start = end
    return tuple(words)


def _bytes_list(array: np.ndarray | None) -> list[object]:
    return [] if array is None else list(array.reshape(-1))


def _one_of(arrays: Mapping[str, np.ndarray], name: str, old_name: str) -> int | None:
    value, old = scalar_int(arrays, name), scalar_int(arrays, old_name)
    if value is not None and old is not None and value != old:
        raise InvalidArgument(old_name, f"is the older name of {name}; give one of them (got {old} and {value})")
    return value if value is not None else old


def _check_range(name: str, value: float | None, low: float | None, high: float | None) -> None:
    """Finite and within [low, high] (None: unbounded); written so that NaN fails."""
    if value is None:
        return
    if not np.isfinite(value):
        raise InvalidArgument(name, f"must be finite, got {value}")
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise InvalidArgument(name, f"must be in {bounds}, got {value}")
