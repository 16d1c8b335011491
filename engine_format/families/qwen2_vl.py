"""The Qwen2-VL / Qwen2.5-VL family's `vision/config.json`: tower architecture, token ids, preprocessing.

What it is for: the family's schema (docs/design/families.md): parsing and
validating its `vision/config.json` (docs/design/multimodal.md) into a frozen
dataclass shared by the builder (which writes it), the loader (which checks
`vision/encoder.safetensors` against it) and the runtime family; and the single
statement of which tensors the tower holds and their shapes. The `vision` object
keeps the HF vision_config field names of each generation (Qwen2-VL: embed_dim /
mlp_ratio / hidden_size; Qwen2.5-VL: hidden_size / intermediate_size /
out_hidden_size); `QwenVisionConfig` normalises them. The language model is M-RoPE.
Not for: preprocessing images (runtime/families/qwen2_vl/preprocess.py) or running the tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_format.errors import EngineLoadError
from engine_format.families.base import VisionSchema, check_mean_std, get_field, int_list, vision_header

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
LLM_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
PREPROCESSING_INT_KEYS = ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels")
NORM_EPS = 1e-6     # HF hard-codes the tower's LayerNorm / RMSNorm epsilon


@dataclass(frozen=True, slots=True)
class QwenVisionConfig:
    model_type: str                 # qwen2_vl | qwen2_5_vl
    dtype: str                      # of vision/encoder.safetensors
    depth: int
    embed_dim: int                  # width of the blocks
    num_heads: int
    intermediate_size: int          # MLP width
    hidden_act: str                 # quick_gelu (Qwen2-VL) | silu (Qwen2.5-VL)
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int            # merger output = the LLM hidden size
    rope_theta: float
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    preprocessing: dict[str, Any]   # PreprocessConfig.from_dict input
    window_size: int = 0            # Qwen2.5-VL window attention, in pixels
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float = 0.0  # Qwen2.5-VL video M-RoPE; 0 for Qwen2-VL

    @property
    def token_ids(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in TOKEN_ID_KEYS}

    @property
    def position_scheme(self) -> str:
        return "mrope"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2

    @property
    def uses_windows(self) -> bool:
        return self.model_type == "qwen2_5_vl"

    @property
    def window_merged_side(self) -> int:
        """Window side in merged tokens (HF `vit_merger_window_size`)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_json(cls, data: dict[str, Any], file: str) -> "QwenVisionConfig":
        model_type, dtype, vision, v = vision_header(data, file, MODEL_TYPES)
        is_25 = model_type == "qwen2_5_vl"
        embed_dim = v("hidden_size") if is_25 else v("embed_dim")
        fields: dict[str, Any] = dict(
            model_type=model_type, dtype=dtype, depth=v("depth"), embed_dim=embed_dim, num_heads=v("num_heads"),
            intermediate_size=v("intermediate_size") if is_25 else embed_dim * v("mlp_ratio"),
            hidden_act=v("hidden_act", str), in_channels=v("in_channels"), patch_size=v("patch_size"),
            temporal_patch_size=v("temporal_patch_size"), spatial_merge_size=v("spatial_merge_size"),
            out_hidden_size=get_field(data, "out_hidden_size", int, file), rope_theta=v("rope_theta", float),
            **{key: get_field(data, key, int, file) for key in TOKEN_ID_KEYS},
            preprocessing=_preprocessing(data.get("preprocessing"), file),
            tokens_per_second=get_field(data, "tokens_per_second", float, file) if is_25 else 0.0)
        if is_25:
            fields.update(window_size=v("window_size"),
                          fullatt_block_indexes=tuple(int_list(vision, "fullatt_block_indexes", file, "vision.")))
        cfg = cls(**fields)
        cfg._check(file, data)
        return cfg

    def _check(self, file: str, data: dict[str, Any]) -> None:
        for key in ("depth", "embed_dim", "num_heads", "intermediate_size", "in_channels", "patch_size",
                    "temporal_patch_size", "spatial_merge_size", "out_hidden_size"):
            if getattr(self, key) < 1:
                raise EngineLoadError(file, f"must be >= 1, got {getattr(self, key)}", key)
        if self.embed_dim % self.num_heads or self.head_dim % 4:
            raise EngineLoadError(file, f"embed width {self.embed_dim} / num_heads {self.num_heads} must give a "
                                  "head_dim divisible by 4 (2-D rotary)", "vision.num_heads")
        expected_act = "silu" if self.uses_windows else "quick_gelu"
        if self.hidden_act != expected_act:
            raise EngineLoadError(file, f"{self.model_type} uses {expected_act!r}, got {self.hidden_act!r}",
                                  "vision.hidden_act")
        if data.get("spatial_merge_size", self.spatial_merge_size) != self.spatial_merge_size:
            raise EngineLoadError(file, "disagrees with vision.spatial_merge_size", "spatial_merge_size")
        pre = self.preprocessing
        for key, ours in (("patch_size", self.patch_size), ("temporal_patch_size", self.temporal_patch_size),
                          ("merge_size", self.spatial_merge_size)):
            if pre[key] != ours:
                raise EngineLoadError(file, f"{pre[key]} disagrees with the tower's {ours}", f"preprocessing.{key}")
        if self.uses_windows:
            if self.window_merged_side < 1:
                raise EngineLoadError(file, f"window_size {self.window_size} is smaller than one merged token "
                                      f"({self.patch_size * self.spatial_merge_size} pixels)", "vision.window_size")
            bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
            if bad:
                raise EngineLoadError(file, f"block index {bad[0]} outside 0..{self.depth - 1}",
                                      "vision.fullatt_block_indexes")


def _preprocessing(value: Any, file: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EngineLoadError(file, "expected an object", "preprocessing")
    for key in PREPROCESSING_INT_KEYS:
        number = get_field(value, key, int, file, "preprocessing.")
        if number < 1:
            raise EngineLoadError(file, f"must be >= 1, got {number}", f"preprocessing.{key}")
    if value["min_pixels"] > value["max_pixels"]:
        raise EngineLoadError(file, f"min_pixels {value['min_pixels']} exceeds max_pixels {value['max_pixels']}",
                              "preprocessing.min_pixels")
    check_mean_std(value, file)
    get_field(value, "rescale_factor", float, file, "preprocessing.")
    return dict(value)


def tensor_shapes(cfg: QwenVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of `vision/encoder.safetensors` (HF names without the `visual.` prefix) and its shape."""
    e, inter, merged = cfg.embed_dim, cfg.intermediate_size, cfg.embed_dim * cfg.merge_unit
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (e, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
        "merger.ln_q.weight": (e,),
        "merger.mlp.0.weight": (merged, merged), "merger.mlp.0.bias": (merged,),
        "merger.mlp.2.weight": (cfg.out_hidden_size, merged), "merger.mlp.2.bias": (cfg.out_hidden_size,),
    }
    if not cfg.uses_windows:
        shapes["merger.ln_q.bias"] = (e,)             # LayerNorm; Qwen2.5-VL uses RMSNorm
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (e,), p + "norm2.weight": (e,),
                       p + "attn.qkv.weight": (3 * e, e), p + "attn.qkv.bias": (3 * e,),
                       p + "attn.proj.weight": (e, e), p + "attn.proj.bias": (e,)})
        if cfg.uses_windows:
            for name in ("gate_proj", "up_proj"):
                shapes.update({f"{p}mlp.{name}.weight": (inter, e), f"{p}mlp.{name}.bias": (inter,)})
            shapes.update({p + "mlp.down_proj.weight": (e, inter), p + "mlp.down_proj.bias": (e,)})
        else:
            shapes.update({p + "norm1.bias": (e,), p + "norm2.bias": (e,),
                           p + "mlp.fc1.weight": (inter, e), p + "mlp.fc1.bias": (inter,),
                           p + "mlp.fc2.weight": (e, inter), p + "mlp.fc2.bias": (e,)})
    return shapes


SCHEMA = VisionSchema(family="qwen2_vl", model_types=MODEL_TYPES, llm_architectures=LLM_ARCHITECTURES,
                      parse=QwenVisionConfig.from_json, tensor_shapes=tensor_shapes)
