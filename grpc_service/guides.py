"""Structured-output guides from the gRPC APIs' wire fields: the native `GuidedDecoding` message and the
Triton TensorRT-LLM backend's `guided_decoding_guide_type` / `guided_decoding_guide` inputs.

What it is for: turning what a client sent into the runtime's `GuidedDecoding`
(refusing unknown or missing parts by field name). TensorRT-LLM's guide types
map as json -> any JSON object, json_schema, regex, ebnf_grammar -> ebnf;
its structural_tag is refused. Compiling (and refusing what cannot be
enforced) is `ServedModel.prepare_guide`, called before admission.
Not for: OpenAI's response_format / tool_choice (grpc_service/http/structured.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from grpc_service.engine_host import ServedModel
from grpc_service.errors import InvalidArgument
from grpc_service.proto import trtserve_pb2 as pb
from runtime.sampling_params import GuidedDecoding, SamplingParams

NATIVE_FIELD = "sampling.guided_decoding"
TRITON_TYPE, TRITON_GUIDE = "guided_decoding_guide_type", "guided_decoding_guide"
TRITON_KINDS = {"json": "json_object", "json_schema": "json_schema", "regex": "regex", "ebnf_grammar": "ebnf"}


def native_guide(sampling: pb.SamplingParameters) -> tuple[GuidedDecoding, str] | None:
    """The guide and the field that named it, or None when the request has none."""
    if not sampling.HasField("guided_decoding"):
        return None
    message = sampling.guided_decoding
    which = message.WhichOneof("guide")
    if which is None:
        raise InvalidArgument(NATIVE_FIELD, "set one of json_schema, json_object, regex or ebnf")
    field = f"{NATIVE_FIELD}.{which}"
    if which == "json_object":
        if not message.json_object:
            raise InvalidArgument(field, "set it to true (or leave guided_decoding unset)")
        return GuidedDecoding("json_object"), field
    return GuidedDecoding(which, getattr(message, which)), field


async def with_native_guide(params: SamplingParams, sampling: pb.SamplingParameters,
                            model: ServedModel) -> SamplingParams:
    """`params` with the request's guide, compiled (off the event loop) before admission."""
    found = native_guide(sampling)
    if found is None:
        return params
    guide, field = found
    await model.prepare_guide(guide, field)
    return replace(params, guided_decoding=guide)


def triton_guide(arrays: Mapping[str, np.ndarray]) -> GuidedDecoding | None:
    """The guide of a Triton request's guided_decoding_guide_type / guided_decoding_guide tensors."""
    guide_type, guide = _text(arrays, TRITON_TYPE), _text(arrays, TRITON_GUIDE)
    if guide_type is None:
        if guide:
            raise InvalidArgument(TRITON_TYPE, f"is required when {TRITON_GUIDE} is given")
        return None
    kind = TRITON_KINDS.get(guide_type)
    if kind is None:
        raise InvalidArgument(TRITON_TYPE, f"must be one of {sorted(TRITON_KINDS)}, got {guide_type[:32]!r}")
    if kind != "json_object" and not guide:
        raise InvalidArgument(TRITON_GUIDE, f"is required for guide type {guide_type!r}")
    return GuidedDecoding(kind, guide or "")


def _text(arrays: Mapping[str, np.ndarray], name: str) -> str | None:
    array = arrays.get(name)
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InvalidArgument(name, "is not valid UTF-8") from None
