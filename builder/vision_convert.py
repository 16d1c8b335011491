"""Write the vision tower of a Qwen2-VL / Qwen2.5-VL checkpoint into the engine directory.

What it is for: `vision/config.json` (tower architecture as HF resolves it,
token ids, preprocessing parameters) and `vision/encoder.safetensors` (the HF
tower's tensors with the `visual.` / `model.visual.` prefix removed, checked
against `engine_format.vision_config.vision_tensor_shapes`, cast to the build dtype).
Not for: the language model (builder/convert.py) or the ONNX export
(builder/vision_export.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from builder.convert import ConversionError
from engine_format.llm_config import SHORT_DTYPES
from engine_format.families.qwen2_vl import TOKEN_ID_KEYS
from engine_format.vision_config import VisionConfig, parse_vision_config, vision_tensor_shapes

VISION_PREFIXES = ("model.visual.", "visual.")     # transformers 5 in-memory names, hub checkpoints
PREPROCESSOR_FILE = "preprocessor_config.json"


def vision_config_json(hf_dir: Path, dtype: str, preset_preprocessing: dict[str, Any] | None) -> dict[str, Any]:
    """The `vision/config.json` object, with the tower's fields as transformers resolves them (defaults included)."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(hf_dir))
    v = hf.vision_config
    vision: dict[str, Any] = {
        "depth": v.depth, "hidden_act": v.hidden_act, "num_heads": v.num_heads, "in_channels": v.in_channels,
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "rope_theta": float((getattr(v, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
    }
    if hf.model_type == "qwen2_5_vl":
        vision.update(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                      out_hidden_size=v.out_hidden_size, window_size=v.window_size,
                      fullatt_block_indexes=list(v.fullatt_block_indexes), tokens_per_second=v.tokens_per_second)
        out_hidden = v.out_hidden_size
    else:
        vision.update(embed_dim=v.embed_dim, mlp_ratio=v.mlp_ratio, hidden_size=v.hidden_size)
        out_hidden = v.hidden_size
    data: dict[str, Any] = {
        "model_type": hf.model_type, "dtype": SHORT_DTYPES[dtype], "vision": vision, "out_hidden_size": out_hidden,
        **{key: getattr(hf, key) for key in TOKEN_ID_KEYS},
        "spatial_merge_size": v.spatial_merge_size,
        "preprocessing": preprocessing_params(hf_dir, preset_preprocessing),
    }
    if hf.model_type == "qwen2_5_vl":
        data["tokens_per_second"] = v.tokens_per_second
    return data


def preprocessing_params(hf_dir: Path, preset_preprocessing: dict[str, Any] | None) -> dict[str, Any]:
    """Image-processor parameters: the checkpoint's preprocessor_config.json wins, else the preset's."""
    path = hf_dir / PREPROCESSOR_FILE
    if not path.is_file():
        if preset_preprocessing is None:
            raise ConversionError(f"{hf_dir}: no {PREPROCESSOR_FILE} and no preset preprocessing parameters")
        return dict(preset_preprocessing)
    raw = json.loads(path.read_text())
    size = raw.get("size") or {}
    out = {"min_pixels": raw.get("min_pixels") or size.get("shortest_edge"),
           "max_pixels": raw.get("max_pixels") or size.get("longest_edge"),
           **{k: raw.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                      "image_std", "rescale_factor")}}
    missing = [k for k, value in out.items() if value is None]
    if missing:
        raise ConversionError(f"{path}: missing {missing}")
    return out


def vision_state_dict(hf: dict[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """The tower's tensors under their HF names without prefix, shapes checked, cast to cfg.dtype."""
    prefix = next((p for p in VISION_PREFIXES if any(k.startswith(p) for k in hf)), None)
    if prefix is None:
        raise ConversionError(f"HF checkpoint holds no vision tower tensors ({' or '.join(VISION_PREFIXES)}*)")
    found = {k[len(prefix):]: t for k, t in hf.items() if k.startswith(prefix)}
    expected = vision_tensor_shapes(cfg)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ConversionError(f"HF checkpoint is missing tensor {prefix + missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ConversionError(f"HF tensor {prefix + unexpected[0]!r} is not part of the {cfg.model_type} tower")
    dtype = getattr(torch, cfg.dtype)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        if tuple(found[name].shape) != shape:
            raise ConversionError(f"{prefix + name}: HF tensor shape {list(found[name].shape)} does not match "
                                  f"the vision config (expected {list(shape)})")
        out[name] = found[name].to(dtype).contiguous().clone()
    return out


def write_vision(out_dir: Path, config_json: dict[str, Any], hf: dict[str, torch.Tensor]
                 ) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """Write config.json and encoder.safetensors; return the config and the tensors as written."""
    from safetensors.torch import save_file

    cfg = parse_vision_config(config_json, "vision/config.json")
    tensors = vision_state_dict(hf, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / "encoder.safetensors"), metadata={"format": "pt"})
    return cfg, tensors
