"""shm_arrays: arrays through one shared-memory segment, written with pwrite, read as views of a private mapping.

Round trip of every array kind the codec allows (several dtypes, empty, 0-d, non-contiguous input), bit-equal;
the received arrays are writable without changing the segment and stay valid after the owner unlinks it;
a released segment is gone (second release harmless, unpack refuses it by name); a reference that points
past the segment is refused; nothing is left under /dev/shm.
"""
from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from runtime.core.shm_arrays import SegmentError, pack, release, segment_prefix, unpack

SHM = Path("/dev/shm")


class _Message(msgspec.Struct):
    arrays: list[np.ndarray]
    label: str


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((256, 1176)).astype(np.float32), np.arange(3 * 130, dtype=np.int64).reshape(3, 130),
            rng.standard_normal((5, 7))[:, ::2], np.zeros((0, 4), np.float16), np.array(7, np.int32),
            np.array([1 + 2j], np.complex64), np.array([True, False]), np.arange(3, dtype=">u2")]


def test_round_trip_is_bit_equal_and_release_unlinks() -> None:
    sent = _Message(_arrays(), "x")
    body, segment = pack(sent)
    assert segment is not None and segment.name.startswith(segment_prefix())
    assert (SHM / segment.name).exists()
    got = unpack(body, segment.name, _Message)
    assert got.label == "x" and len(got.arrays) == len(sent.arrays)
    for a, b in zip(sent.arrays, got.arrays):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    got.arrays[0][0, 0] = 123.0              # writable, copy-on-write: the segment keeps the sent value
    again = unpack(body, segment.name, _Message)
    release(segment)
    release(segment)
    assert not (SHM / segment.name).exists()
    with pytest.raises(SegmentError, match="is gone"):
        unpack(body, segment.name, _Message)
    for a, b in zip(sent.arrays, again.arrays):     # the core's arrays outlive the name (a mapping of it)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert got.arrays[0][0, 0] == 123.0


def test_no_arrays_no_segment_and_bad_reference_refused() -> None:
    assert pack(_Message([], "text only"))[1] is None
    body, segment = pack(_Message([np.ones(4, np.float32)], "y"))
    assert segment is not None
    try:
        forged = msgspec.msgpack.encode({"arrays": [["<f4", [1 << 20], 0]], "label": "y"})
        # msgspec re-raises the decode hook's SegmentError as its ValidationError (both ValueErrors), same text
        with pytest.raises(ValueError, match="does not fit segment"):
            unpack(forged, segment.name, _Message)
        with pytest.raises(ValueError, match="names none"):
            unpack(body, None, _Message)
    finally:
        release(segment)
    assert not list(SHM.glob(f"{segment_prefix()}*"))
