"""The InternVL2.5 family's `vision/config.json`: tower architecture, token ids, tiling parameters.

What it is for: the family's schema (docs/design/families.md): parsing and
validating its `vision/config.json` (model_type "internvl") into a frozen dataclass
shared by the builder (which writes it), the loader (which checks
`vision/encoder.safetensors` against it) and the runtime family
(runtime/families/internvl/); and the single statement of which tensors the tower
holds and their shapes. The language model is a plain 1-D RoPE Qwen2 or Llama.
Tensor names are those of transformers' `-hf` checkpoints (`vision_tower.*`,
`multi_modal_projector.*`); the builder maps the other layouts onto them.
Layout of the file:
`{"model_type": "internvl", "dtype", "vision": {hidden_size, num_hidden_layers,
num_attention_heads, intermediate_size, hidden_act, layer_norm_eps, attention_bias,
image_size, patch_size, num_channels}, "downsample_ratio", "projector_hidden_act",
"out_hidden_size", "image_token_id" (<IMG_CONTEXT>), "image_start_token_id" (<img>),
"image_end_token_id" (</img>), optional "video_token_id" (the `<video>` marker of
transformers' chat template; without it the engine takes images only), "preprocessing":
{tile_size, patch_size, min_tiles, max_tiles, use_thumbnail, image_mean, image_std,
rescale_factor}}`.
Not for: preprocessing images (runtime/families/internvl/preprocess.py) or running the tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_format.errors import EngineLoadError
from engine_format.families.base import VisionSchema, check_dtype, get_field, object_field

MODEL_TYPE = "internvl"
LLM_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
TOKEN_ID_KEYS = ("image_token_id", "image_start_token_id", "image_end_token_id")
PROJECTOR_NORM_EPS = 1e-5     # mlp1.0 / multi_modal_projector.layer_norm: nn.LayerNorm's default in both layouts
TOWER = "vision_tower."
PROJECTOR = "multi_modal_projector."


@dataclass(frozen=True, slots=True)
class InternVLVisionConfig:
    dtype: str                      # of vision/encoder.safetensors
    hidden_size: int                # width of the ViT blocks
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    layer_norm_eps: float
    attention_bias: bool
    image_size: int                 # the tile side the position embeddings were trained for
    patch_size: int
    num_channels: int
    downsample_ratio: float         # 0.5: pixel shuffle = a 2x2 merge
    out_hidden_size: int            # projector output = the LLM hidden size
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    preprocessing: dict[str, Any]   # TilingConfig.from_dict input
    video_token_id: int | None = None
    model_type: str = MODEL_TYPE

    @property
    def token_ids(self) -> dict[str, int]:
        ids = {key: getattr(self, key) for key in TOKEN_ID_KEYS}
        return ids if self.video_token_id is None else {**ids, "video_token_id": self.video_token_id}

    @property
    def position_scheme(self) -> str:
        return "rope"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches_per_tile(self) -> int:
        return self.patches_per_side ** 2

    @property
    def merge_size(self) -> int:
        return round(1 / self.downsample_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * P * P."""
        return self.num_channels * self.patch_size ** 2

    @property
    def tokens_per_tile(self) -> int:
        return self.patches_per_tile // self.merge_size ** 2

    @classmethod
    def from_json(cls, data: Any, file: str) -> "InternVLVisionConfig":
        if not isinstance(data, dict):
            raise EngineLoadError(file, "expected a JSON object")
        if data.get("model_type") != MODEL_TYPE:
            raise EngineLoadError(file, f"expected {MODEL_TYPE!r}, got {data.get('model_type')!r}", "model_type")
        dtype = check_dtype(data, file)
        vision = object_field(data, "vision", file)
        v = lambda key, kind=int: get_field(vision, key, kind, file, "vision.")   # noqa: E731
        for key, want in (("hidden_act", "gelu"),):
            if v(key, str) != want:
                raise EngineLoadError(file, f"only {want!r} is supported, got {vision[key]!r}", f"vision.{key}")
        if get_field(data, "projector_hidden_act", str, file) != "gelu":
            raise EngineLoadError(file, f"only 'gelu' is supported, got {data['projector_hidden_act']!r}",
                                  "projector_hidden_act")
        preprocessing = object_field(data, "preprocessing", file)
        if not isinstance(vision.get("attention_bias"), bool):
            raise EngineLoadError(file, f"expected true or false, got {vision.get('attention_bias')!r}",
                                  "vision.attention_bias")
        cfg = cls(
            dtype=dtype, hidden_size=v("hidden_size"), num_hidden_layers=v("num_hidden_layers"),
            num_attention_heads=v("num_attention_heads"), intermediate_size=v("intermediate_size"),
            layer_norm_eps=v("layer_norm_eps", float), attention_bias=vision["attention_bias"],
            image_size=v("image_size"), patch_size=v("patch_size"), num_channels=v("num_channels"),
            downsample_ratio=get_field(data, "downsample_ratio", float, file),
            out_hidden_size=get_field(data, "out_hidden_size", int, file),
            **{key: get_field(data, key, int, file) for key in TOKEN_ID_KEYS}, preprocessing=dict(preprocessing),
            video_token_id=get_field(data, "video_token_id", int, file) if "video_token_id" in data else None)
        cfg._check(file)
        return cfg

    def _check(self, file: str) -> None:
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                    "patch_size", "num_channels", "out_hidden_size"):
            if getattr(self, key) < 1:
                raise EngineLoadError(file, f"must be >= 1, got {getattr(self, key)}", f"vision.{key}")
        if self.hidden_size % self.num_attention_heads:
            raise EngineLoadError(file, f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                  f"{self.num_attention_heads}", "vision.num_attention_heads")
        if self.downsample_ratio != 0.5:
            raise EngineLoadError(file, f"only 0.5 (a 2x2 pixel shuffle) is supported, got {self.downsample_ratio}",
                                  "downsample_ratio")
        if self.image_size % (self.patch_size * self.merge_size):
            raise EngineLoadError(file, f"image_size {self.image_size} is not a multiple of "
                                  f"{self.patch_size * self.merge_size} (patch_size x merge)", "vision.image_size")
        pre = self.preprocessing
        for key, ours in (("tile_size", self.image_size), ("patch_size", self.patch_size)):
            if pre.get(key) != ours:
                raise EngineLoadError(file, f"{pre.get(key)!r} disagrees with the tower's {ours}",
                                      f"preprocessing.{key}")


def internvl_tensor_shapes(cfg: InternVLVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an InternVL `vision/encoder.safetensors` and its shape (transformers' names)."""
    e, inter, c, p = cfg.hidden_size, cfg.intermediate_size, cfg.num_channels, cfg.patch_size
    merged = e * cfg.merge_size ** 2
    emb = TOWER + "embeddings."
    shapes: dict[str, tuple[int, ...]] = {
        emb + "cls_token": (1, 1, e),
        emb + "position_embeddings": (1, cfg.patches_per_tile + 1, e),
        emb + "patch_embeddings.projection.weight": (e, c, p, p),
        emb + "patch_embeddings.projection.bias": (e,),
        PROJECTOR + "layer_norm.weight": (merged,), PROJECTOR + "layer_norm.bias": (merged,),
        PROJECTOR + "linear_1.weight": (cfg.out_hidden_size, merged),
        PROJECTOR + "linear_1.bias": (cfg.out_hidden_size,),
        PROJECTOR + "linear_2.weight": (cfg.out_hidden_size, cfg.out_hidden_size),
        PROJECTOR + "linear_2.bias": (cfg.out_hidden_size,),
    }
    for i in range(cfg.num_hidden_layers):
        pre = f"{TOWER}encoder.layer.{i}."
        shapes.update({pre + "lambda_1": (e,), pre + "lambda_2": (e,),
                       pre + "attention.projection_layer.weight": (e, e), pre + "attention.projection_layer.bias": (e,),
                       pre + "mlp.fc1.weight": (inter, e), pre + "mlp.fc1.bias": (inter,),
                       pre + "mlp.fc2.weight": (e, inter), pre + "mlp.fc2.bias": (e,)})
        for norm in ("layernorm_before", "layernorm_after"):
            shapes.update({f"{pre}{norm}.weight": (e,), f"{pre}{norm}.bias": (e,)})
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{pre}attention.{proj}.weight"] = (e, e)
            if cfg.attention_bias:
                shapes[f"{pre}attention.{proj}.bias"] = (e,)
    return shapes


SCHEMA = VisionSchema(family=MODEL_TYPE, model_types=(MODEL_TYPE,), llm_architectures=LLM_ARCHITECTURES,
                      parse=InternVLVisionConfig.from_json, tensor_shapes=internvl_tensor_shapes)
