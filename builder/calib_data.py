"""Calibration texts: the bundled set and `--calib-data` JSONL files, checked before any work.

What it is for: reading the calibration samples for quantization (one JSON
object per line with a non-empty "text"; "image" entries only for VL engines)
and refusing bad files with a one-line error naming the flag. The bundled set
(builder/configs/calib/calib_texts.jsonl, package data) is used when no file is given.
Not for: running calibration (builder/quantize.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from builder.presets import CONFIGS_DIR

BUNDLED_CALIB = CONFIGS_DIR / "calib" / "calib_texts.jsonl"
MAX_CALIB_SIZE = 4096


class QuantizeError(ValueError):
    """A quantization flag or its input is unusable; the message names the flag and the reason."""


def read_calib_texts(path: Path | None, size: int, vision_language: bool) -> list[str]:
    """The first `size` texts of the file (or the bundled set); raises QuantizeError naming the flag."""
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
    texts: list[str] = []
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
        texts.append(text)
        if len(texts) == size:
            break
    if not texts:
        raise QuantizeError(f"{flag}: {source} holds no calibration samples")
    return texts
