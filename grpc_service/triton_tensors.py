"""KServe v2 tensors <-> numpy, checked against a model's `ModelConfig`.

What it is for: `decode_inputs` turns a `ModelInferRequest` into named numpy
arrays and refuses, with INVALID_ARGUMENT naming the tensor, anything a Triton
server would refuse: unknown, missing, duplicate or mistyped tensors, shapes
that disagree with the config (the leading batch dimension must be 1: one
request per request), and raw byte sizes that disagree with the shape.
`requested_outputs` checks the requested output names; `encode_response`
writes outputs the way tritonclient reads them: every output raw, by position
in `raw_output_contents`, BYTES as 4-byte little-endian length + bytes.
Not for: what the values mean (triton_params.py).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from grpc_service.errors import InvalidArgument
from grpc_service.triton_schema import kserve_datatype
from grpc_service.visual_inputs import MAX_VISUAL_SOURCES
from runtime.sampling_params import MAX_BAD_WORDS, MAX_STOP_STRINGS

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
MAX_ELEMENTS = 1 << 24     # far beyond any legal input; keeps a forged shape from allocating gigabytes
# BYTES list tensors (decoded element by element): their entry limits, checked from the shape before decoding
LIST_TENSOR_LIMITS = {"stop_words": MAX_STOP_STRINGS, "bad_words": MAX_BAD_WORDS,
                      "STOP_WORDS_DICT": MAX_BAD_WORDS, "BAD_WORDS_DICT": MAX_BAD_WORDS,
                      "image_url_input": MAX_VISUAL_SOURCES}


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str            # KServe datatype: BYTES, INT32, FP32, ...
    array: np.ndarray        # BYTES: an object array of bytes


def decode_inputs(request: pb.ModelInferRequest, config: mc.ModelConfig) -> dict[str, np.ndarray]:
    """Named input arrays, shaped as sent (batch dimension included)."""
    specs = {spec.name: spec for spec in config.input}
    num_raw = len(request.raw_input_contents)
    if num_raw and num_raw != len(request.inputs):
        raise InvalidArgument("raw_input_contents", f"holds {num_raw} entries for {len(request.inputs)} inputs; "
                                                    "send every input raw or none")
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidArgument(name, "input tensor given more than once")
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(name, f"unexpected input tensor for model {config.name!r} "
                                        f"(inputs: {', '.join(sorted(specs))})")
        if "shared_memory_region" in tensor.parameters:
            raise InvalidArgument(name, "shared-memory inputs are not supported; send the data in the request")
        expected = kserve_datatype(spec.data_type)
        if tensor.datatype != expected:
            raise InvalidArgument(name, f"datatype is {tensor.datatype!r}, model {config.name!r} expects {expected!r}")
        shape = _check_shape(name, tuple(tensor.shape), tuple(spec.dims), config.max_batch_size)
        count = math.prod(shape)
        if count > LIST_TENSOR_LIMITS.get(name, MAX_ELEMENTS):
            raise InvalidArgument(name, f"{count} entries exceed the limit of {LIST_TENSOR_LIMITS[name]}")
        if num_raw:
            array = _from_raw(name, expected, request.raw_input_contents[index], count)
        else:
            array = _from_contents(name, expected, tensor.contents, count)
        arrays[name] = array.reshape(shape)
    for spec in config.input:
        if not spec.optional and spec.name not in arrays:
            raise InvalidArgument(spec.name, f"required input tensor is missing for model {config.name!r}")
    return arrays


def requested_outputs(request: pb.ModelInferRequest, config: mc.ModelConfig) -> list[str]:
    """Names the client asked for, in its order (empty: the model's default set)."""
    known = {spec.name for spec in config.output}
    names: list[str] = []
    for output in request.outputs:
        if output.name not in known:
            raise InvalidArgument(output.name, f"unexpected requested output for model {config.name!r} "
                                               f"(outputs: {', '.join(sorted(known))})")
        if output.name in names:
            raise InvalidArgument(output.name, "requested output given more than once")
        if "shared_memory_region" in output.parameters:
            raise InvalidArgument(output.name, "shared-memory outputs are not supported")
        names.append(output.name)
    return names


def encode_response(config: mc.ModelConfig, request_id: str, outputs: list[OutputTensor],
                    final: bool | None) -> pb.ModelInferResponse:
    """A response with every output raw. `final` (streaming only) sets triton_final_response."""
    response = pb.ModelInferResponse(model_name=config.name, model_version="1", id=request_id)
    for output in outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.array.shape)
        response.raw_output_contents.append(_to_raw(output))
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return response


def _check_shape(name: str, shape: tuple[int, ...], dims: tuple[int, ...], max_batch_size: int) -> tuple[int, ...]:
    expected = ((-1,) + dims) if max_batch_size > 0 else dims
    shown = "[" + ",".join(str(d) for d in expected) + "]"
    if len(shape) != len(expected) or any(want != -1 and got != want for got, want in zip(shape, expected)):
        raise InvalidArgument(name, f"shape {list(shape)} does not match the model's {shown}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(name, f"shape {list(shape)} has a negative dimension")
    if max_batch_size > 0 and shape[0] != 1:
        raise InvalidArgument(name, f"batch dimension is {shape[0]}; send one request per batch of 1 "
                                    "(the server batches requests in flight)")
    if math.prod(shape) > MAX_ELEMENTS:
        raise InvalidArgument(name, f"shape {list(shape)} holds more than {MAX_ELEMENTS} elements")
    return shape


def _from_raw(name: str, datatype: str, raw: bytes, count: int) -> np.ndarray:
    if datatype == "BYTES":
        return _parse_bytes_elements(name, raw, count)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(name, f"datatype {datatype} is not supported")
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(name, f"raw byte size {len(raw)} does not match the shape: {count} x {datatype} "
                                    f"is {count * dtype.itemsize} bytes")
    return np.frombuffer(raw, dtype=dtype)


def _parse_bytes_elements(name: str, raw: bytes, count: int) -> np.ndarray:
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 4 or len(elements) == count:
            raise InvalidArgument(name, f"raw byte size {len(raw)} does not match {count} BYTES element(s) "
                                        "(each is a 4-byte little-endian length, then the bytes)")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if size > len(raw) - offset:
            raise InvalidArgument(name, f"BYTES element {len(elements)} claims {size} bytes, "
                                        f"only {len(raw) - offset} remain")
        elements.append(raw[offset:offset + size])
        offset += size
    if len(elements) != count:
        raise InvalidArgument(name, f"holds {len(elements)} BYTES element(s), the shape says {count}")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def _from_contents(name: str, datatype: str, contents: pb.InferTensorContents, count: int) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(name, f"datatype {datatype} must be sent in raw_input_contents")
    values = list(getattr(contents, field))
    if len(values) != count:
        raise InvalidArgument(name, f"contents hold {len(values)} element(s), the shape says {count}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = values
        return array
    dtype = NUMPY_DTYPES[datatype]
    try:
        return np.array(values, dtype=dtype) if values else np.empty(0, dtype=dtype)
    except OverflowError:
        raise InvalidArgument(name, f"a value does not fit {datatype}") from None


def _to_raw(output: OutputTensor) -> bytes:
    if output.datatype == "BYTES":
        parts = []
        for item in output.array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.ascontiguousarray(output.array, dtype=NUMPY_DTYPES[output.datatype]).tobytes()
