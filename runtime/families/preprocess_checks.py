"""The checks every family's `preprocessing` block of `vision/config.json` shares.

What it is for: validating that block's common parts when a family builds its
config from it (an object with known keys, positive integers, finite mean / std
triples, a positive rescale factor); each refusal is a FieldError naming
`preprocessing.<key>` and the rule.
Not for: a family's own rules (tile sizes, pixel limits, pinpoints: the family's
preprocess.py) or the engine-directory schema (engine_format/families/).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from runtime.errors import FieldError

FIELD = "preprocessing"


def check_keys(d: object, known: Collection[str], required: Collection[str]) -> Mapping[str, object]:
    """`d` as a mapping holding every required key and no other than the known ones (the first, sorted, named)."""
    if not isinstance(d, Mapping):
        raise FieldError(FIELD, f"must be an object, got {type(d).__name__}")
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise FieldError(f"{FIELD}.{unknown[0]}", "unknown key")
    missing = sorted(k for k in required if k not in d)
    if missing:
        raise FieldError(f"{FIELD}.{missing[0]}", "missing")
    return d


def positive_int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FieldError(f"{FIELD}.{key}", f"must be an integer >= 1, got {value!r}")
    return value


def finite_float(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(f"{FIELD}.{key}", f"must be a finite number, got {value!r}")
    return float(value)


def positive_float(key: str, value: object) -> float:
    """A finite number > 0 (the rescale factor)."""
    number = finite_float(key, value)
    if not number > 0:
        raise FieldError(f"{FIELD}.{key}", f"must be > 0, got {number}")
    return number


def float_triple(key: str, value: object, positive: bool) -> tuple[float, float, float]:
    """Three finite numbers (a per-channel mean or std); `positive`: each > 0."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise FieldError(f"{FIELD}.{key}", f"must be a list of 3 numbers, got {value!r}")
    numbers = tuple(finite_float(f"{key}[{i}]", v) for i, v in enumerate(value))
    if positive and not all(v > 0 for v in numbers):
        raise FieldError(f"{FIELD}.{key}", f"every entry must be > 0, got {list(numbers)}")
    return numbers  # type: ignore[return-value]
