"""The registry of vision-language families for the builder, keyed by the HF config's model_type.

What it is for: `build_family_for(model_type)` (source resolution, presets, the
pipeline's vision stages) and `build_family_for_vision(cfg)` (validation, from a
parsed `vision/config.json`), the one way generic build code reaches a family
(docs/design/families.md). A new family adds its instances to `BUILD_FAMILIES`.
Not for: the families' mappings (builder/families/<family>.py).
"""
from __future__ import annotations

from builder.families import internvl, llava, qwen2_vl
from builder.families.base import BuildFamily
from engine_format.vision_config import VisionConfig

BUILD_FAMILIES: tuple[BuildFamily, ...] = (*qwen2_vl.FAMILIES, llava.FAMILY, internvl.FAMILY)


def vl_model_types() -> tuple[str, ...]:
    """Every HF model_type a vision-language family builds (also the preset `family:` names)."""
    return tuple(model_type for family in BUILD_FAMILIES for model_type in family.hf_architectures)


def build_family_for(model_type: str) -> BuildFamily | None:
    """The family that builds checkpoints of this HF model_type; None for a text-only model."""
    return next((family for family in BUILD_FAMILIES if model_type in family.hf_architectures), None)


def build_family_for_vision(cfg: VisionConfig) -> BuildFamily:
    """The family that wrote this `vision/config.json` (its model_type is the HF one)."""
    family = build_family_for(cfg.model_type)
    if family is None:
        raise ValueError(f"vision/config.json model_type {cfg.model_type!r} has no build family "
                         f"(known: {', '.join(vl_model_types())})")
    return family
