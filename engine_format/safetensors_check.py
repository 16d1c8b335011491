"""Structural check of a .safetensors file before any tensor is read.

What it is for: refusing truncated, aliased (overlapping) or inconsistent files
with a message naming the file and the tensor, instead of a library error or a
half-loaded model. Reads only the header and the file size.
Not for: reading tensor data (safetensors.torch does that afterwards).
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

from engine_format.errors import EngineLoadError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path, name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Return {tensor: (dtype, shape)} after checking every offset against the file."""
    size = path.stat().st_size
    if size < 8:
        raise EngineLoadError(name, f"truncated: {size} bytes, no header")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise EngineLoadError(name, f"truncated or corrupt: header length {header_len} exceeds file size {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EngineLoadError(name, "corrupt header (not JSON)") from None
    if not isinstance(header, dict):
        raise EngineLoadError(name, "corrupt header (not an object)")
    data_len = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise EngineLoadError(name, "corrupt header entry", tensor) from None
        if dtype not in DTYPE_BYTES:
            raise EngineLoadError(name, f"unsupported dtype {dtype!r}", tensor)
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype] or begin < 0:
            raise EngineLoadError(name, f"data size {end - begin} does not match shape {list(shape)} {dtype}", tensor)
        if end > data_len:
            raise EngineLoadError(name, f"truncated: data ends at {end}, file holds {data_len} data bytes", tensor)
        spans.append((begin, end, tensor))
        tensors[tensor] = (dtype, shape)
    spans.sort()
    for (b0, e0, t0), (b1, e1, t1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise EngineLoadError(name, f"tensors {t0!r} and {t1!r} overlap (aliased data)", t1)
    return tensors


def read_header_with_names(path: Path, rel: str, expected_names: Iterable[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The header of a safetensors file that must hold exactly `expected_names`; refusals name the first
    missing or unexpected tensor. Shapes and dtypes are the caller's to check (their rules differ)."""
    if not path.is_file():
        raise EngineLoadError(rel, "missing")
    header = read_safetensors_header(path, rel)
    expected = set(expected_names)
    missing = sorted(expected - set(header))
    if missing:
        raise EngineLoadError(rel, f"missing tensor (and {len(missing) - 1} more)" if len(missing) > 1
                              else "missing tensor", missing[0])
    unexpected = sorted(set(header) - expected)
    if unexpected:
        raise EngineLoadError(rel, "unexpected tensor for this config", unexpected[0])
    return header
