"""Images built in code for the multimodal tests and the demo: good ones in every pixel mode REFERENCE.md
section 6 names, and the bad ones (truncated, corrupt, a decompression-bomb header in a few bytes)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB gradient whose colours depend on `seed` (different seeds: different images)."""
    ys, xs = np.mgrid[0:height, 0:width]
    r = (xs * 255 // max(width - 1, 1) + 40 * seed) % 256
    g = (ys * 255 // max(height - 1, 1) + 80 * seed) % 256
    b = ((xs + ys) * 127 // max(width + height - 2, 1) + 120 * seed) % 256
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient_png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    return encode(gradient(width, height, seed))


def animated_gif(num_frames: int = 4, size: int = 32) -> bytes:
    frames = [gradient(size, size, seed) for seed in range(num_frames)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=250, loop=0)


def cmyk_jpeg() -> bytes:
    return encode(gradient(40, 30).convert("CMYK"), "JPEG")


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(32 * 24, dtype=np.uint32).reshape(24, 32) * 80).astype(np.uint16)
    return encode(Image.fromarray(ramp))


def palette_png() -> bytes:
    return encode(gradient(40, 30).convert("P", palette=Image.Palette.ADAPTIVE, colors=16))


def truncated_png() -> bytes:
    data = gradient_png(64, 64)
    return data[: len(data) // 2]


def corrupt_bytes() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def bomb_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height, then IEND: 45 bytes, 10^10 pixels claimed."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = b""
    for kind, body in ((b"IHDR", ihdr), (b"IEND", b"")):
        chunks += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunks
