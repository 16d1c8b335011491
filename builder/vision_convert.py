"""Write the vision tower of a vision-language checkpoint into the engine directory, whatever the family.

What it is for: `vision/config.json` (the family's object, checked by parsing
it back through engine_format) and `vision/encoder.safetensors` (the tensors the
family maps out of the HF checkpoint, checked name by name and shape by shape
against `engine_format.vision_config.vision_tensor_shapes`, cast to the build dtype).
Not for: a family's HF names or config fields (builder/families/), the language
model (builder/convert.py) or the ONNX export (builder/vision_export.py).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from builder.convert import ConversionError
from builder.families.base import BuildFamily
from engine_format.vision_config import VisionConfig, parse_vision_config, vision_tensor_shapes


def vision_state_dict(hf: Mapping[str, torch.Tensor], cfg: VisionConfig, family: BuildFamily
                      ) -> dict[str, torch.Tensor]:
    """The tower's tensors under their engine names, every name and shape checked, cast to cfg.dtype."""
    found = family.vision_tensors(hf, cfg)
    expected = vision_tensor_shapes(cfg)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ConversionError(f"HF checkpoint is missing the {cfg.model_type} tower tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ConversionError(f"HF tensor {unexpected[0]!r} is not part of the {cfg.model_type} tower")
    dtype = getattr(torch, cfg.dtype)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        if tuple(found[name].shape) != shape:
            raise ConversionError(f"{name}: HF tensor shape {list(found[name].shape)} does not match "
                                  f"the vision config (expected {list(shape)})")
        out[name] = found[name].to(dtype).contiguous().clone()
    return out


def write_vision(out_dir: Path, config_json: dict, hf: Mapping[str, torch.Tensor], family: BuildFamily
                 ) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """Write config.json and encoder.safetensors; return the config and the tensors as written."""
    from safetensors.torch import save_file

    cfg = parse_vision_config(config_json, "vision/config.json")
    tensors = vision_state_dict(hf, cfg, family)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / "encoder.safetensors"), metadata={"format": "pt"})
    return cfg, tensors
