"""The registry of vision-language families for the runtime, keyed by `vision/config.json` model_type.

What it is for: `vision_family(config)`, the one way generic code (processor,
admission, encoders, memory profile, ONNX export) gets the family behaviour of
an engine (docs/design/families.md). A new family adds one entry to `FAMILIES`.
Not for: the families' behaviour (runtime/families/<family>/) or file schemas (engine_format/families/).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine_format.families import internvl as internvl_schema
from engine_format.families import llava as llava_schema
from engine_format.families import qwen2_vl as qwen2_vl_schema
from engine_format.vision_config import VisionConfig
from runtime.families.base import VisionFamily
from runtime.families.internvl import InternVLFamily
from runtime.families.llava import LlavaFamily
from runtime.families.qwen2_vl import Qwen2VLFamily

# (vision/config.json model types, constructor taking that family's parsed config)
FAMILIES: tuple[tuple[tuple[str, ...], Callable[[Any], VisionFamily]], ...] = (
    (qwen2_vl_schema.MODEL_TYPES, Qwen2VLFamily),
    (llava_schema.MODEL_TYPES, LlavaFamily),
    ((internvl_schema.MODEL_TYPE,), InternVLFamily),
)


def vision_family(config: VisionConfig) -> VisionFamily:
    """The runtime family of an engine's parsed vision config (engine.vision.config)."""
    for model_types, make in FAMILIES:
        if config.model_type in model_types:
            return make(config)
    known = [t for model_types, _ in FAMILIES for t in model_types]
    raise ValueError(f"vision/config.json model_type {config.model_type!r} has no runtime family (known: {known})")
