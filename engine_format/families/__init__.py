"""The registry of vision-language family schemas, keyed by `vision/config.json` model_type.

What it is for: mapping a `vision/config.json` model_type to the family schema
that parses it (docs/design/families.md). A new family adds its module's
`SCHEMA` to `SCHEMAS`.
Not for: parsing itself (engine_format/vision_config.py) or runtime behaviour.
"""
from __future__ import annotations

from engine_format.errors import EngineLoadError
from engine_format.families import internvl, llava, qwen2_vl
from engine_format.families.base import VisionSchema

SCHEMAS: tuple[VisionSchema, ...] = (qwen2_vl.SCHEMA, llava.SCHEMA, internvl.SCHEMA)


def known_model_types() -> tuple[str, ...]:
    return tuple(model_type for schema in SCHEMAS for model_type in schema.model_types)


def schema_for(model_type: object, file: str) -> VisionSchema:
    """The schema owning `model_type`; EngineLoadError(file, ..., "model_type") naming the known ones."""
    for schema in SCHEMAS:
        if model_type in schema.model_types:
            return schema
    raise EngineLoadError(file, f"must be one of {known_model_types()}, got {model_type!r}", "model_type")
