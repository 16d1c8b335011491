"""The typed messages between the server's front end and the engine-core process, and their codec.

What it is for: the only things that cross the process boundary, as msgspec
structs encoded with MessagePack (no pickle of anything a client sent): to the
core `AddRequest` (the EngineRequest with its sampling parameters and, for VL
engines, its preprocessed images), `AbortRequest`, `StatsQuery`, `Shutdown`;
from the core `CoreReady` (what the front end needs to know: KV pool bytes,
batch size, tokenizer and EOS ids), `CoreOutputs` (every delta of one step in one message: token ids, no text),
`AddRefused` (the engine's door said no: field and message), `StatsReply` and
`CoreFailed` (the core could not start). A VL request's multimodal inputs
travel as MessagePack bytes whose numpy arrays (pixel values, M-RoPE
positions) lie in a shared-memory segment of their own (runtime/core/shm_arrays.py);
any other numpy array travels as dtype, shape and raw bytes.
Not for: sockets and processes (runtime/core/core_process.py, process_engine.py).
"""
from __future__ import annotations

from typing import Any, Union

import msgspec
import numpy as np

from runtime.core.engine_core import EngineStats
from runtime.core.request import EngineRequest
from runtime.core.shm_arrays import Segment, pack, unpack
from runtime.multimodal.processor import MultimodalInputs
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams

MAX_ARRAY_BYTES = 1 << 31     # one array in one message; a preprocessed image is far below it


class WireRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    cache_salt: str | None
    multimodal: bytes | None      # MultimodalInputs as MessagePack, its arrays in `segment`
    segment: str | None           # the shared-memory segment holding them

    @classmethod
    def of(cls, request: EngineRequest) -> tuple[WireRequest, Segment | None]:
        """The message, and the segment the caller now owns (unlink it with shm_arrays.release)."""
        body, segment = pack(request.multimodal) if request.multimodal is not None else (None, None)
        return cls(request.request_id, list(request.prompt_token_ids), request.sampling_params, request.cache_salt,
                   body, segment.name if segment is not None else None), segment

    def engine_request(self) -> EngineRequest:
        """The request, its arrays views of a private mapping of the segment; SegmentError when it is gone."""
        multimodal = (unpack(self.multimodal, self.segment, MultimodalInputs) if self.multimodal is not None
                      else None)
        return EngineRequest(self.request_id, self.prompt_token_ids, self.sampling_params, self.cache_salt,
                             multimodal)


class AbortRequest(msgspec.Struct, tag="abort", array_like=True):
    request_id: str


class StatsQuery(msgspec.Struct, tag="stats", array_like=True):
    call_id: int


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    kv_cache_bytes: int
    max_batch_size: int
    pid: int
    tokenizer_dir: str            # the front end detokenizes with the same tokenizer
    eos_token_ids: list[int]      # ... and applies the same stop rules


class CoreOutputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[RequestOutput]


class AddRefused(msgspec.Struct, tag="refused", array_like=True):
    request_id: str
    field: str            # "" when the refusal named no field
    message: str


class StatsReply(msgspec.Struct, tag="stats_reply", array_like=True):
    call_id: int
    stats: EngineStats | None
    error: str = ""


class CoreFailed(msgspec.Struct, tag="failed", array_like=True):
    message: str


ToCore = Union[WireRequest, AbortRequest, StatsQuery, Shutdown]
FromCore = Union[CoreReady, CoreOutputs, AddRefused, StatsReply, CoreFailed]


def _encode_extra(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return (obj.dtype.str, list(obj.shape), np.ascontiguousarray(obj).tobytes())
    raise NotImplementedError(f"cannot send a {type(obj).__name__} to the engine core")


def _decode_extra(kind: type, obj: Any) -> Any:
    if kind is np.ndarray:
        dtype, shape, data = obj
        if len(data) > MAX_ARRAY_BYTES:
            raise ValueError(f"array of {len(data)} bytes exceeds {MAX_ARRAY_BYTES}")
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    raise NotImplementedError(f"cannot receive a {kind}")


class Codec:
    """Encoder and decoders of both directions (one per process side; not thread-safe)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_encode_extra)
        self._to_core = msgspec.msgpack.Decoder(ToCore, dec_hook=_decode_extra)
        self._from_core = msgspec.msgpack.Decoder(FromCore, dec_hook=_decode_extra)

    def encode(self, message: ToCore | FromCore) -> bytes:
        return self._encoder.encode(message)

    def decode_to_core(self, data: bytes) -> ToCore:
        return self._to_core.decode(data)

    def decode_from_core(self, data: bytes) -> FromCore:
        return self._from_core.decode(data)
