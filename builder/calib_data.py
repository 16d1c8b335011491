"""Calibration samples: the bundled set and `--calib-data` JSONL files, checked before any work.

What it is for: reading the calibration samples for quantization (one JSON
object per line with a non-empty "text"; for VL engines optionally "image" / "images",
file paths relative to the JSONL file or data: URLs, decoded by builder/calib_images.py)
and refusing bad files with a one-line error naming the flag. The bundled set
(builder/configs/calib/calib_texts.jsonl, package data) is used when no file is given;
a VL engine's bundled set interleaves generated images with questions about them.
Not for: running calibration (builder/quantize.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from builder.calib_images import CalibImageError, bundled_vl_pairs, image_refs, load_image_ref
from builder.presets import CONFIGS_DIR

BUNDLED_CALIB = CONFIGS_DIR / "calib" / "calib_texts.jsonl"
MAX_CALIB_SIZE = 4096


class QuantizeError(ValueError):
    """A quantization flag or its input is unusable; the message names the flag and the reason."""


@dataclass(frozen=True, slots=True)
class CalibSample:
    text: str
    images: tuple[Image.Image, ...] = ()     # decoded RGB, in the record's order (VL engines only)

    def digest(self) -> str:
        """Content hash of the text and the pixels (the build's input hash covers the calibration data)."""
        h = hashlib.sha256(self.text.encode())
        for image in self.images:
            h.update(f"{image.size}".encode())
            h.update(image.tobytes())
        return h.hexdigest()


def read_calib_texts(path: Path | None, size: int, vision_language: bool) -> list[str]:
    """The texts of `read_calib_samples` (a text model's calibration set)."""
    return [sample.text for sample in read_calib_samples(path, size, vision_language)]


def read_calib_samples(path: Path | None, size: int, vision_language: bool) -> list[CalibSample]:
    """The first `size` samples of the file (or the bundled set); raises QuantizeError naming the flag."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_CALIB_SIZE:
        raise QuantizeError(f"--calib-size: must be an integer in [1, {MAX_CALIB_SIZE}], got {size!r}")
    flag = "--calib-data" if path is not None else f"bundled calibration set {BUNDLED_CALIB}"
    source = path if path is not None else BUNDLED_CALIB
    if not source.is_file():
        raise QuantizeError(f"{flag}: {source} is not a file")
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise QuantizeError(f"{flag}: {source} is not UTF-8 text (expected JSONL)") from None
    samples: list[CalibSample] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise QuantizeError(f"{flag}: {source} line {number} is not JSON (expected one "
                                f'{{"text": ...}} object per line)') from None
        if not isinstance(record, dict):
            raise QuantizeError(f"{flag}: {source} line {number}: expected a JSON object, got "
                                f"{type(record).__name__}")
        if ("image" in record or "images" in record) and not vision_language:
            raise QuantizeError(f"{flag}: {source} line {number} has images, but the model is a text model")
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise QuantizeError(f"{flag}: {source} line {number}: needs a non-empty string \"text\"")
        try:
            images = tuple(load_image_ref(ref, source.parent) for ref in image_refs(record))
        except CalibImageError as exc:
            raise QuantizeError(f"{flag}: {source} line {number}: {exc}") from None
        samples.append(CalibSample(text, images))
        if len(samples) == size:
            break
    if not samples:
        raise QuantizeError(f"{flag}: {source} holds no calibration samples")
    if path is None and vision_language:
        samples = _interleave([CalibSample(q, (image,)) for q, image in bundled_vl_pairs()], samples)[:size]
    return samples


def _interleave(first: list[CalibSample], second: list[CalibSample]) -> list[CalibSample]:
    out: list[CalibSample] = []
    for i in range(max(len(first), len(second))):
        out.extend(s[i] for s in (first, second) if i < len(s))
    return out
