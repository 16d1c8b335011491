"""The numpy arrays of one message through one shared-memory segment (image tensors to the engine core).

What it is for: `pack` (front end) encodes a msgspec-encodable object as
MessagePack with each numpy array replaced by (dtype, shape, offset), and
copies the arrays into one new POSIX shared-memory segment; `unpack` (engine
core) decodes it, copying each array out of the segment, and closes its
mapping. Nothing is pickled: the message is MessagePack, the arrays raw bytes.
The front end owns each segment and unlinks it with `release` once the core
has answered for the request (it has copied the arrays by then), or when the
request ends, is aborted or the core dies; should the server itself be
killed, its multiprocessing resource tracker unlinks what was left. The core
only attaches, and unregisters the segment from its own resource tracker so
that its exit never unlinks (or warns about) a segment it does not own (the
name, which holds the creator's pid, tells whether it does).
Segment names start with `segment_prefix()` of the creating process, so a
test can look for leaks.
Not for: the message types or their socket (runtime/core/ipc.py, process_engine.py).
"""
from __future__ import annotations

import os
import secrets
import sys
from typing import Any, TypeVar

import msgspec
import numpy as np
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

ALIGN = 64                      # each array starts on a cache line
ARRAY_KINDS = "biufc"           # plain numbers only (no object or void dtypes from a message)
_T = TypeVar("_T")


class SegmentError(ValueError):
    """A segment is gone, or a reference points outside it; the message says which."""


def segment_prefix(pid: int | None = None) -> str:
    return f"trtserve_{os.getpid() if pid is None else pid}_"


def pack(obj: object) -> tuple[bytes, SharedMemory | None]:
    """`obj` as MessagePack with its arrays in a new segment (None when it holds no array)."""
    arrays: list[tuple[int, np.ndarray]] = []
    size = 0

    def to_ref(value: Any) -> Any:
        nonlocal size
        if not isinstance(value, np.ndarray):
            raise NotImplementedError(f"cannot send a {type(value).__name__} to the engine core")
        array = np.ascontiguousarray(value)
        arrays.append((size, array))
        ref = (array.dtype.str, list(array.shape), size)
        size += -(-array.nbytes // ALIGN) * ALIGN
        return ref

    body = msgspec.msgpack.Encoder(enc_hook=to_ref).encode(obj)
    if not arrays:
        return body, None
    segment = SharedMemory(f"{segment_prefix()}{secrets.token_hex(6)}", create=True, size=max(size, 1))
    try:
        for offset, array in arrays:
            target = np.ndarray(array.shape, array.dtype, buffer=segment.buf, offset=offset)
            target[...] = array
            del target              # the segment's buffer must have no view left when it is closed
    except BaseException:
        release(segment)
        raise
    return body, segment


def unpack(body: bytes, segment_name: str | None, kind: type[_T]) -> _T:
    """Decode what `pack` made, each array copied out of the segment (which is then closed, not unlinked)."""
    segment = _attach(segment_name) if segment_name else None

    def from_ref(wanted: type, ref: Any) -> Any:
        if wanted is not np.ndarray:
            raise NotImplementedError(f"cannot receive a {wanted}")
        if segment is None:
            raise SegmentError("an array refers to a shared-memory segment, but the message names none")
        dtype_str, shape, offset = ref
        dtype = np.dtype(dtype_str)
        count = int(np.prod(shape, dtype=np.int64))
        if dtype.kind not in ARRAY_KINDS or min(shape, default=0) < 0 or offset < 0 or \
                offset + count * dtype.itemsize > segment.size:
            raise SegmentError(f"array {dtype_str} {shape} at offset {offset} does not fit segment "
                               f"{segment_name} of {segment.size} bytes")
        view = np.ndarray(shape, dtype, buffer=segment.buf, offset=offset)
        array = view.copy()
        del view
        return array

    try:
        return msgspec.msgpack.Decoder(kind, dec_hook=from_ref).decode(body)
    finally:
        if segment is not None:
            segment.close()


def release(segment: SharedMemory) -> None:
    """Close and unlink a segment this process created (a second call changes nothing)."""
    segment.close()
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


def _attach(name: str) -> SharedMemory:
    try:
        if sys.version_info >= (3, 13):
            return SharedMemory(name, track=False)
        segment = SharedMemory(name)
    except FileNotFoundError:
        raise SegmentError(f"shared-memory segment {name} is gone (the request was given up)") from None
    # Python < 3.13 registers an attached segment with this process's resource tracker, which would unlink it
    # when this process exits; the creator owns it (and, when that is this process, the registration too).
    if not name.startswith(segment_prefix()):
        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment
