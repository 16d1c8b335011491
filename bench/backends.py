"""One benchmark request over the wire, timed: the native API or the KServe v2 `ensemble` model.

What it is for: asyncio clients (grpc.aio) that send one request with a fixed
output length (native: `ignore_eos`; ensemble: `min_tokens` = `max_tokens`,
as Triton benchmarks do), stream the answer and return a `RequestRecord`:
send time, first-token time, end time, and token counts taken from what the
server returned. `COUNT_SOURCES` says how each count is obtained, per
protocol; the JSON report repeats it.
Not for: the synchronous scripting clients (grpc_service/client.py) or
scheduling (loadgen.py).
"""
from __future__ import annotations

import asyncio
import struct
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np

from grpc_service.proto import trtserve_pb2 as pb
from grpc_service.proto import trtserve_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES))

COUNT_SOURCES = {
    "native": {
        "prompt_tokens": "usage.prompt_tokens of the final GenerateResponse",
        "output_tokens": "usage.completion_tokens of the final GenerateResponse "
                         "(checked against the streamed token_ids)",
        "cached_tokens": "usage.cached_tokens of the final GenerateResponse",
        "ttft": "client clock: send -> first response carrying token ids",
    },
    "triton": {
        "prompt_tokens": "the native Tokenize RPC on the same server, on the text_input sent "
                         "(what the ensemble's preprocessing encodes), plus each image's vision block "
                         "(Tokenize of a chat message with and without the image)",
        "output_tokens": "entries of output_log_probs over all streamed responses (return_log_probs=true: "
                         "one log-prob per generated token)",
        "cached_tokens": "kv_cache_reused_blocks x tokens_per_block of the final response "
                         "(return_perf_metrics=true)",
        "ttft": "client clock: send -> first response carrying text",
    },
}


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request: the user text (and its ids), images, and the output length to force. A session's
    turn holds only the turn's new part; loadgen.next_request prepends the history."""

    text: str
    token_ids: tuple[int, ...]
    output_len: int
    images: tuple[bytes, ...] = ()


@dataclass(slots=True)
class RequestRecord:
    start_s: float
    end_s: float = 0.0
    first_token_s: float | None = None
    prompt_tokens: int | None = None       # None: counted after the level (Triton, via Tokenize)
    output_tokens: int = 0
    cached_tokens: int | None = None
    output_text: str = ""
    output_ids: list[int] = field(default_factory=list)
    prompt_text: str = ""
    prompt_images: tuple[bytes, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class NativeBackend:
    protocol = "native"

    def __init__(self, target: str, model: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = trtserve_pb2_grpc.LLMServiceStub(self.channel)
        self.model = model

    async def close(self) -> None:
        await self.channel.close()

    async def send(self, request: BenchRequest) -> RequestRecord:
        message = pb.GenerateRequest(model=self.model, request_id=uuid.uuid4().hex, sampling=pb.SamplingParameters(
            max_tokens=request.output_len, temperature=0.0, ignore_eos=True))
        if request.images:            # token ids cannot carry images: the text, with one vision block per image
            message.text = request.text
            message.images.extend(pb.Image(data=data) for data in request.images)
        else:
            message.token_ids.ids.extend(request.token_ids)
        record = RequestRecord(time.perf_counter(), prompt_text=request.text, prompt_images=request.images)
        text: list[str] = []
        call = self.stub.Generate(message)
        try:
            async for response in call:
                if response.token_ids and record.first_token_s is None:
                    record.first_token_s = time.perf_counter()
                record.output_ids.extend(response.token_ids)
                text.append(response.text)
                if response.finished:
                    usage = response.usage
                    record.prompt_tokens = usage.prompt_tokens
                    record.output_tokens = usage.completion_tokens
                    record.cached_tokens = usage.cached_tokens
        except grpc.aio.AioRpcError as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            call.cancel()
            raise
        record.end_s = time.perf_counter()
        record.output_text = "".join(text)
        if record.ok and record.output_tokens != len(record.output_ids):
            record.error = (f"usage.completion_tokens {record.output_tokens} != {len(record.output_ids)} "
                            "streamed token ids")
        return record


class TritonBackend:
    """The `ensemble` model over ModelStreamInfer, one stream per request, as tritonclient streams."""

    protocol = "triton"

    def __init__(self, target: str, model: str, tokens_per_block: int) -> None:
        from tritonclient.grpc import service_pb2_grpc

        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.model = model
        self.tokens_per_block = tokens_per_block

    async def close(self) -> None:
        await self.channel.close()

    def infer_request(self, request: BenchRequest) -> object:
        from tritonclient.grpc import service_pb2

        message = service_pb2.ModelInferRequest(model_name=self.model, id=uuid.uuid4().hex)
        text = request.text.encode("utf-8")
        _add_input(message, "text_input", "BYTES", [1, 1], struct.pack("<I", len(text)) + text)
        for name in ("max_tokens", "min_tokens"):
            _add_input(message, name, "INT32", [1, 1], np.int32(request.output_len).tobytes())
        for name in ("stream", "exclude_input_in_output", "return_log_probs", "return_perf_metrics"):
            _add_input(message, name, "BOOL", [1, 1], b"\x01")
        if request.images:
            _add_images(message, request.images)
        return message

    async def send(self, request: BenchRequest) -> RequestRecord:
        message = self.infer_request(request)
        record = RequestRecord(time.perf_counter(), prompt_text=request.text, prompt_images=request.images)
        text: list[str] = []
        call = self.stub.ModelStreamInfer()
        try:
            await call.write(message)
            await call.done_writing()
            async for stream_response in call:
                if stream_response.error_message:
                    record.error = f"error_message: {stream_response.error_message}"
                    break
                response = stream_response.infer_response
                outputs = {out.name: raw for out, raw in zip(response.outputs, response.raw_output_contents)}
                delta = _bytes_elements(outputs.get("text_output", b""))
                if delta and delta[0] and record.first_token_s is None:
                    record.first_token_s = time.perf_counter()
                text.extend(d.decode("utf-8", errors="replace") for d in delta)
                record.output_tokens += len(outputs.get("output_log_probs", b"")) // 4
                if response.parameters["triton_final_response"].bool_param:
                    reused = outputs.get("kv_cache_reused_blocks")
                    if reused:
                        record.cached_tokens = int(np.frombuffer(reused, np.int32)[0]) * self.tokens_per_block
                    break
        except grpc.aio.AioRpcError as exc:
            record.error = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            call.cancel()          # no-op once the server has ended the stream
        record.end_s = time.perf_counter()
        record.output_text = "".join(text)
        return record


def _add_input(message: object, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    tensor = message.inputs.add()  # type: ignore[attr-defined]
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(shape)
    message.raw_input_contents.append(raw)  # type: ignore[attr-defined]


def _add_images(message: object, images: tuple[bytes, ...]) -> None:
    """`image_bytes_input` UINT8 [1, num_images, 1, 1, max_len]: encoded images, each zero-padded to the longest
    (decoders stop at the image's end marker)."""
    width = max(len(data) for data in images)
    array = np.zeros((1, len(images), 1, 1, width), dtype=np.uint8)
    for i, data in enumerate(images):
        array[0, i, 0, 0, :len(data)] = np.frombuffer(data, dtype=np.uint8)
    _add_input(message, "image_bytes_input", "UINT8", list(array.shape), array.tobytes())


def _bytes_elements(raw: bytes) -> list[bytes]:
    """KServe BYTES raw content: each element a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset + 4 <= len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return elements
