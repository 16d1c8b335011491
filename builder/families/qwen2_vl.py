"""The Qwen2-VL / Qwen2.5-VL family's build side: its Hugging Face checkpoint in, `vision/` out.

What it is for: the family's `BuildFamily` (docs/design/families.md): the
`vision/config.json` object from the HF config as transformers resolves it
(defaults included) and the checkpoint's `preprocessor_config.json`; the
tensor names of both hub layouts (LLM under `model.` or transformers 5's
`model.language_model.`, tower under `visual.` or `model.visual.`); transformers'
own tower as the validation reference; and what a random-weight checkpoint of a
`tiny-*` preset needs (token ids in the config, a preprocessor_config.json).
Not for: the generic build stages (builder/vision_*.py) or the schema
(engine_format/families/qwen2_vl.py).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.convert import ConversionError, text_config
from builder.families.base import HFTower, LLMKeys, OfflineTokens, preprocessing_params
from engine_format.families.qwen2_vl import LLM_ARCHITECTURES, MODEL_TYPES, TOKEN_ID_KEYS, QwenVisionConfig
from engine_format.llm_config import SHORT_DTYPES

VISION_PREFIXES = ("model.visual.", "visual.")     # transformers 5 in-memory names, hub checkpoints
LLM_PREFIXES = ("model.language_model.", "model.")  # transformers 5 in-memory names, hub checkpoints
PREPROCESSING_KEYS = ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels",
                      "image_mean", "image_std", "rescale_factor")
SPECIAL_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                  "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
# Several images per call, a video (t > 1), sizes above one Qwen2.5-VL window at real shape (8 x 8 patches).
VALIDATION_GRIDS: tuple[tuple[tuple[int, ...], ...], ...] = (
    ((1, 2, 2),), ((1, 6, 8), (1, 10, 4)), ((2, 4, 6),), ((1, 12, 20), (3, 2, 4)))


class Qwen2VLBuild:
    """`BuildFamily` of Qwen2-VL or Qwen2.5-VL checkpoints (one instance per HF model_type)."""

    name = "qwen2_vl"
    preprocessing_keys = PREPROCESSING_KEYS
    special_tokens = SPECIAL_TOKENS
    validation_grids = VALIDATION_GRIDS
    offline_tokenizer: OfflineTokens | None = None     # the shared offline tokenizer carries Qwen's tokens

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type
        self.hf_architectures = {model_type: dict(zip(MODEL_TYPES, LLM_ARCHITECTURES))[model_type]}

    def llm_architecture(self, hf_config: dict[str, Any]) -> str:
        return self.hf_architectures[self.model_type]      # the LLM is M-RoPE: its own architecture

    def text_config(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        return text_config(hf_config)

    def llm_keys(self, hf_names: Collection[str]) -> LLMKeys:
        nested = any(name.startswith(LLM_PREFIXES[0]) for name in hf_names)
        return LLMKeys(LLM_PREFIXES[0] if nested else LLM_PREFIXES[1], "lm_head.weight")

    def vision_config_json(self, hf_dir: Path, dtype: str, preset_preprocessing: dict[str, Any] | None
                           ) -> dict[str, Any]:
        return vision_config_json(hf_dir, dtype, preset_preprocessing)

    def vision_tensors(self, hf: Mapping[str, torch.Tensor], cfg: QwenVisionConfig) -> dict[str, torch.Tensor]:
        prefix = next((p for p in VISION_PREFIXES if any(k.startswith(p) for k in hf)), None)
        if prefix is None:
            raise ConversionError(f"HF checkpoint holds no vision tower tensors ({' or '.join(VISION_PREFIXES)}*)")
        return {k[len(prefix):]: t for k, t in hf.items() if k.startswith(prefix)}

    def hf_preprocessor_config(self, preprocessing: dict[str, Any]) -> dict[str, Any]:
        """An HF `preprocessor_config.json` for the Qwen2-VL image processor (both spellings of the pixel limits)."""
        processor = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[self.model_type]
        return {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor,
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
            **preprocessing,
            "size": {"shortest_edge": preprocessing["min_pixels"], "longest_edge": preprocessing["max_pixels"]},
        }

    def transformers_checkpoint(self, hf_dir: Path, cache_dir: Path) -> Path:
        return hf_dir           # both hub layouts load in transformers

    def hf_tower(self, hf_dir: Path, cfg: QwenVisionConfig) -> HFTower:
        tower = hf_tower(hf_dir, getattr(torch, cfg.dtype))
        inputs = (("pixel_values", np.float32, (-1, cfg.patch_dim)), ("grid_thw", np.int64, (-1, 3)))
        return HFTower(inputs, lambda f: tower(f["pixel_values"], grid_thw=f["grid_thw"]).pooler_output)


FAMILIES = tuple(Qwen2VLBuild(model_type) for model_type in MODEL_TYPES)


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
        "preprocessing": preprocessing_params(hf_dir, preset_preprocessing, _preprocessing),
    }
    if hf.model_type == "qwen2_5_vl":
        data["tokens_per_second"] = v.tokens_per_second
    return data


def _preprocessing(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Image-processor parameters from the checkpoint's preprocessor_config.json (`raw`, read from `path`)."""
    size = raw.get("size") or {}
    out = {"min_pixels": raw.get("min_pixels") or size.get("shortest_edge"),
           "max_pixels": raw.get("max_pixels") or size.get("longest_edge"),
           **{k: raw.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                      "image_std", "rescale_factor")}}
    missing = [k for k, value in out.items() if value is None]
    if missing:
        raise ConversionError(f"{path}: missing {missing}")
    return out


def hf_tower(hf_dir: Path, dtype: torch.dtype) -> Any:
    """transformers' vision tower with the checkpoint's own tensors, rounded to `dtype`, in float32."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = AutoConfig.from_pretrained(str(hf_dir))
    tower_class = {"qwen2_vl": Qwen2VisionTransformerPretrainedModel,
                   "qwen2_5_vl": Qwen2_5_VisionTransformerPretrainedModel}[config.model_type]
    tower = tower_class._from_config(config.vision_config, dtype=torch.float32).eval()
    state: dict[str, torch.Tensor] = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                prefix = next((p for p in VISION_PREFIXES if key.startswith(p)), None)
                if prefix:
                    state[key[len(prefix):]] = f.get_tensor(key).to(dtype).float()
    tower.load_state_dict(state, strict=True)
    return tower
