"""The numpy arrays of one message through one shared-memory segment (image tensors to the engine core).

What it is for: `pack` (front end) encodes a msgspec-encodable object as
MessagePack with each numpy array replaced by (dtype, shape, offset), and
writes the arrays into one new POSIX shared-memory segment; `unpack` (engine
core) decodes it, reading each array out of the segment into a new array.
Nothing is pickled: the message is MessagePack, the arrays raw bytes.
The segment is used as a file (one pwrite per array into it, one preadv per array out of it), not
mapped: a fresh mapping costs a page fault per 4 KiB page on each side, and the attaching side of
`multiprocessing.shared_memory` registers with (and here at once unregisters from) a resource
tracker process, several pipe writes per request: about 0.9 ms to pack and 0.4 ms to unpack one
224x224 image's 1.2 MB of patches that way, against a few hundred microseconds now (issue 13).
The front end owns each segment and unlinks it with `release` once the core
has answered for the request (it has copied the arrays by then), or when the
request ends, is aborted or the core dies; should the server itself be
killed, its multiprocessing resource tracker (which `pack` registers each
segment with, as `SharedMemory` does) unlinks what was left. The core only
opens the segment read-only and never registers it, so its exit never
unlinks (or warns about) a segment it does not own.
Segment names start with `segment_prefix()` of the creating process, so a
test can look for leaks. POSIX shared memory as on Linux (a segment is a file the fd reads and writes).
Not for: the message types or their socket (runtime/core/ipc.py, process_engine.py).
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any, TypeVar

import _posixshmem
import msgspec
import numpy as np
from multiprocessing import resource_tracker

ALIGN = 64                      # each array starts on a cache line
ARRAY_KINDS = "biufc"           # plain numbers only (no object or void dtypes from a message)
_T = TypeVar("_T")


class SegmentError(ValueError):
    """A segment is gone, or a reference points outside it; the message says which."""


@dataclass(slots=True)
class Segment:
    """A segment this process created with `pack`: its name goes in the message; `release` unlinks it."""
    name: str
    size: int
    released: bool = False


def segment_prefix(pid: int | None = None) -> str:
    return f"trtserve_{os.getpid() if pid is None else pid}_"


def pack(obj: object) -> tuple[bytes, Segment | None]:
    """`obj` as MessagePack with its arrays in a new segment (None when it holds no array)."""
    arrays: list[tuple[int, np.ndarray]] = []
    size = 0

    def to_ref(value: Any) -> Any:
        nonlocal size
        if not isinstance(value, np.ndarray):
            raise NotImplementedError(f"cannot send a {type(value).__name__} to the engine core")
        array = value if value.flags.c_contiguous else value.copy(order="C")   # (ascontiguousarray makes 0-d 1-d)
        arrays.append((size, array))
        ref = (array.dtype.str, list(array.shape), size)
        size += -(-array.nbytes // ALIGN) * ALIGN
        return ref

    body = msgspec.msgpack.Encoder(enc_hook=to_ref).encode(obj)
    if not arrays:
        return body, None
    segment = Segment(f"{segment_prefix()}{secrets.token_hex(6)}", max(size, 1))
    fd = _posixshmem.shm_open("/" + segment.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        resource_tracker.register("/" + segment.name, "shared_memory")
        os.ftruncate(fd, segment.size)
        for offset, array in arrays:
            _write(fd, array, offset)
    except BaseException:
        release(segment)
        raise
    finally:
        os.close(fd)
    return body, segment


def unpack(body: bytes, segment_name: str | None, kind: type[_T]) -> _T:
    """Decode what `pack` made, each array read out of the segment (which is left for its owner to unlink)."""
    fd = _open(segment_name) if segment_name else None
    segment_size = os.fstat(fd).st_size if fd is not None else 0

    def from_ref(wanted: type, ref: Any) -> Any:
        if wanted is not np.ndarray:
            raise NotImplementedError(f"cannot receive a {wanted}")
        if fd is None:
            raise SegmentError("an array refers to a shared-memory segment, but the message names none")
        dtype_str, shape, offset = ref
        dtype = np.dtype(dtype_str)
        count = int(np.prod(shape, dtype=np.int64))
        if dtype.kind not in ARRAY_KINDS or min(shape, default=0) < 0 or offset < 0 or \
                offset + count * dtype.itemsize > segment_size:
            raise SegmentError(f"array {dtype_str} {shape} at offset {offset} does not fit segment "
                               f"{segment_name} of {segment_size} bytes")
        array = np.empty(shape, dtype)
        if array.nbytes and os.preadv(fd, [array], offset) != array.nbytes:
            raise SegmentError(f"segment {segment_name} ended inside array {dtype_str} {shape} at offset {offset}")
        return array

    try:
        return msgspec.msgpack.Decoder(kind, dec_hook=from_ref).decode(body)
    finally:
        if fd is not None:
            os.close(fd)


def release(segment: Segment) -> None:
    """Unlink a segment this process created (a second call changes nothing)."""
    if segment.released:
        return
    segment.released = True
    try:
        _posixshmem.shm_unlink("/" + segment.name)
    except FileNotFoundError:
        pass
    resource_tracker.unregister("/" + segment.name, "shared_memory")


def _write(fd: int, array: np.ndarray, offset: int) -> None:
    view = memoryview(array.reshape(-1).view(np.uint8))      # C-contiguous (pack made it so)
    while view:                                 # one call unless the kernel writes less (over ~2 GiB)
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _open(name: str) -> int:
    try:
        return _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        raise SegmentError(f"shared-memory segment {name} is gone (the request was given up)") from None
