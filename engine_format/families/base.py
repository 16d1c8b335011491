"""What every vision-language family's `vision/config.json` schema provides (docs/design/families.md).

What it is for: the `VisionConfig` protocol (the fields generic code reads of
any family's parsed config), the `VisionSchema` a family module registers
(parser, tensor list, the LLM architectures it sits on), and the field readers
the families' parsers share, each raising `EngineLoadError` naming the file,
the field and the rule.
Not for: any one family's fields (engine_format/families/<family>.py) or the
registry (engine_format/families/__init__.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from engine_format.errors import EngineLoadError

DTYPES = ("float32", "float16", "bfloat16")
POSITION_SCHEMES = ("mrope", "rope")     # M-RoPE (3-axis) language model | plain 1-D RoPE


class VisionConfig(Protocol):
    """The fields generic code reads of a family's parsed `vision/config.json`."""

    @property
    def model_type(self) -> str: ...             # the registry key

    @property
    def dtype(self) -> str: ...                  # of vision/encoder.safetensors

    @property
    def out_hidden_size(self) -> int: ...        # width of the embedding rows (= the LLM hidden size)

    @property
    def preprocessing(self) -> dict[str, Any]: ...

    @property
    def token_ids(self) -> dict[str, int]: ...   # every special token id the family uses, by its config key

    @property
    def position_scheme(self) -> str: ...        # "mrope" | "rope"


@dataclass(frozen=True, slots=True)
class VisionSchema:
    """One family's part of the engine-directory contract."""

    family: str
    model_types: tuple[str, ...]                  # vision/config.json model_type values it parses
    llm_architectures: tuple[str, ...]            # llm/config.json architectures it may sit on
    parse: Callable[[dict[str, Any], str], Any]   # (JSON object, file name) -> the family's VisionConfig
    tensor_shapes: Callable[[Any], dict[str, tuple[int, ...]]]   # every tensor of encoder.safetensors


def get_field(data: dict[str, Any], key: str, kind: type, file: str, where: str = "") -> Any:
    """data[key] as `kind` (an int is accepted as a float; a bool is never a number)."""
    if key not in data:
        raise EngineLoadError(file, "missing key", where + key)
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise EngineLoadError(file, f"expected {kind.__name__}, got {type(value).__name__}", where + key)
    return value


def int_list(data: dict[str, Any], key: str, file: str, where: str = "") -> list[int]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise EngineLoadError(file, f"expected a list of integers, got {value!r}", where + key)
    return value


def check_dtype(data: dict[str, Any], file: str) -> str:
    dtype = data.get("dtype")
    if dtype not in DTYPES:
        raise EngineLoadError(file, f"must be one of {DTYPES}, got {dtype!r}", "dtype")
    return dtype


def object_field(data: dict[str, Any], key: str, file: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise EngineLoadError(file, "expected an object", key)
    return value


def vision_header(data: dict[str, Any], file: str, model_types: tuple[str, ...]
                  ) -> tuple[str, str, dict[str, Any], Callable[..., Any]]:
    """What a family's `vision/config.json` starts with: its model_type (one of model_types), the dtype, the
    `vision` object and a getter of its fields, `(key, kind=int)`, whose errors name `vision.<key>`."""
    model_type = data.get("model_type")
    if model_type not in model_types:
        raise EngineLoadError(file, f"must be one of {model_types}, got {model_type!r}", "model_type")
    dtype = check_dtype(data, file)
    vision = object_field(data, "vision", file)

    def field(key: str, kind: type = int) -> Any:
        return get_field(vision, key, kind, file, "vision.")

    return model_type, dtype, vision, field


def check_positive(values: dict[str, int], file: str, where: str = "") -> None:
    for key, value in values.items():
        if value < 1:
            raise EngineLoadError(file, f"must be >= 1, got {value}", where + key)


def check_mean_std(preprocessing: dict[str, Any], file: str) -> None:
    """`preprocessing.image_mean` / `image_std`: 3 numbers each, every std entry > 0; EngineLoadError naming it."""
    for key in ("image_mean", "image_std"):
        seq = preprocessing.get(key)
        if not (isinstance(seq, list) and len(seq) == 3 and all(isinstance(x, (int, float)) for x in seq)):
            raise EngineLoadError(file, f"expected 3 numbers, got {seq!r}", f"preprocessing.{key}")
    if min(preprocessing["image_std"]) <= 0:
        raise EngineLoadError(file, "must be positive", "preprocessing.image_std")
