"""The numpy arrays of one message through one shared-memory segment (image tensors to the engine core).

What it is for: `pack` (front end) encodes a msgspec-encodable object as
MessagePack with each numpy array replaced by (dtype, shape, offset), and
writes the arrays into one new POSIX shared-memory segment (one pwrite each);
`unpack` (engine core) decodes it, each array a view of one private
(copy-on-write) mapping of the segment: nothing is copied, the core's reads
fault the segment's pages in, and a write (none is made) would copy just that
page. Nothing is pickled: the message is MessagePack, the arrays raw bytes.
Why not `multiprocessing.shared_memory`: its attaching side registers with
(and here at once unregistered from) a resource tracker process, several pipe
writes per request, and both sides copied through fresh mappings: about
0.9 ms to pack and 0.4 ms to unpack one 224x224 image's 1.2 MB of patches
that way (issue 13).
The front end owns each segment and unlinks it with `release` once the core
has answered for the request (the core has mapped it by then, and a mapping
outlives the name), or when the request ends, is aborted or the core dies;
should the server itself be killed, its multiprocessing resource tracker
(which `pack` registers each segment with, as `SharedMemory` does) unlinks
what was left. The core only maps the segment and never registers it, so
its exit never unlinks (or warns about) a segment it does not own; its
mapping goes when the last array viewing it does.
Segment names start with `segment_prefix()` of the creating process, so a
test can look for leaks. POSIX shared memory as on Linux (a segment is a file: written with pwrite, mapped).
Not for: the message types or their socket (runtime/core/ipc.py, process_engine.py).
"""
from __future__ import annotations

import mmap
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
    """Decode what `pack` made; each array is a view of one private (copy-on-write) mapping of the segment."""
    mapping = _map(segment_name) if segment_name else None

    def from_ref(wanted: type, ref: Any) -> Any:
        if wanted is not np.ndarray:
            raise NotImplementedError(f"cannot receive a {wanted}")
        if mapping is None:
            raise SegmentError("an array refers to a shared-memory segment, but the message names none")
        dtype_str, shape, offset = ref
        dtype = np.dtype(dtype_str)
        count = int(np.prod(shape, dtype=np.int64))
        if dtype.kind not in ARRAY_KINDS or min(shape, default=0) < 0 or offset < 0 or \
                offset + count * dtype.itemsize > len(mapping):
            raise SegmentError(f"array {dtype_str} {shape} at offset {offset} does not fit segment "
                               f"{segment_name} of {len(mapping)} bytes")
        if count == 0:
            return np.empty(shape, dtype)
        return np.frombuffer(mapping, dtype, count, offset).reshape(shape)

    return msgspec.msgpack.Decoder(kind, dec_hook=from_ref).decode(body)


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


def _map(name: str) -> mmap.mmap:
    """The whole segment, mapped private: its arrays are writable (a write copies that page, never reaching
    the segment) and stay valid after the owner unlinks the name; unmapped when the last of them is gone."""
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        raise SegmentError(f"shared-memory segment {name} is gone (the request was given up)") from None
    try:
        if os.fstat(fd).st_size == 0:
            raise SegmentError(f"shared-memory segment {name} is empty")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
