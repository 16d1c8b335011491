"""`vision/config.json`, whatever the family: parse it and list the tower's tensors.

What it is for: the generic entry the loader and the builder use
(docs/design/families.md): `parse_vision_config` reads `model_type`, finds the
family's schema in the registry (engine_format/families/) and returns that
family's frozen config, which satisfies `VisionConfig`; `vision_tensor_shapes`
lists every tensor of `vision/encoder.safetensors` for it. Also the constants
build and serve must agree on.
Not for: any family's fields (engine_format/families/<family>.py), preprocessing or running the tower.
"""
from __future__ import annotations

from typing import Any

from engine_format.errors import EngineLoadError
from engine_format.families import schema_for
from engine_format.families.base import VisionConfig, VisionSchema

__all__ = ["MAX_PATCHES_PER_ONNX_CALL", "VisionConfig", "parse_vision_config", "schema_of", "vision_tensor_shapes"]

# The ONNX graphs attend through an [N, N] mask: the runtime runs images in groups of at most this many
# patches, and the optional TensorRT plan's optimisation profile ends there.
MAX_PATCHES_PER_ONNX_CALL = 4096


def parse_vision_config(data: Any, file: str) -> VisionConfig:
    """The family's config for a `vision/config.json` object; EngineLoadError naming the file and field."""
    if not isinstance(data, dict):
        raise EngineLoadError(file, "expected a JSON object")
    return schema_for(data.get("model_type"), file).parse(data, file)


def schema_of(cfg: VisionConfig) -> VisionSchema:
    return schema_for(cfg.model_type, "vision/config.json")


def vision_tensor_shapes(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of `vision/encoder.safetensors` (names without the checkpoint's prefix) and its shape."""
    return schema_of(cfg).tensor_shapes(cfg)
