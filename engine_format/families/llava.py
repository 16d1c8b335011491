"""The LLaVA-1.5 / LLaVA-NeXT family's `vision/config.json`: CLIP tower, projector, anyres grid, token id.

What it is for: the family's schema (docs/design/families.md): parsing and
validating its `vision/config.json` into `LlavaVisionConfig`, shared by the
builder (which writes it), the loader (which checks `vision/encoder.safetensors`
against `tensor_shapes`) and the runtime family (runtime/families/llava/). The
`vision` object keeps HF's CLIPVisionConfig names plus the LLaVA config's
`vision_feature_layer`, `vision_feature_select_strategy`,
`multimodal_projector_bias` and (NeXT) `image_grid_pinpoints`. Only the encoder
layers up to the selected hidden state are stored (`num_layers`). The language
model is a plain 1-D RoPE Llama (Vicuna, Llama-shaped Mistral).
Not for: preprocessing images (runtime/families/llava/preprocess.py) or running the tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine_format.errors import EngineLoadError
from engine_format.families.base import VisionSchema, check_mean_std, get_field, object_field, vision_header

MODEL_TYPES = ("llava", "llava_next")
LLM_ARCHITECTURES = ("LlamaForCausalLM",)
TOWER_ACTS = ("quick_gelu", "gelu")
SELECT_STRATEGIES = ("default", "full")
PREPROCESSING_KEYS = ("image_size", "image_mean", "image_std", "rescale_factor", "do_pad", "image_grid_pinpoints")


@dataclass(frozen=True, slots=True)
class LlavaVisionConfig:
    model_type: str                 # llava | llava_next
    dtype: str                      # of vision/encoder.safetensors
    out_hidden_size: int            # projector output = the LLM hidden size
    image_token_id: int
    preprocessing: dict[str, Any]   # runtime/families/llava/preprocess.py LlavaPreprocessConfig input
    hidden_size: int                # CLIP width
    intermediate_size: int
    num_heads: int
    num_hidden_layers: int          # of the HF tower
    num_layers: int                 # encoder layers run: the index of the selected hidden state
    image_size: int                 # crop side S
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str                 # CLIP MLP activation
    select_strategy: str            # 'default' drops the class token, 'full' keeps it
    projector_bias: bool
    grid_pinpoints: tuple[tuple[int, int], ...] = ()    # NeXT anyres resolutions (h, w); () for 1.5

    @property
    def token_ids(self) -> dict[str, int]:
        return {"image_token_id": self.image_token_id}

    @property
    def position_scheme(self) -> str:
        return "rope"

    @property
    def is_next(self) -> bool:
        return self.model_type == "llava_next"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        return self.patches_per_side ** 2 + (1 if self.select_strategy == "full" else 0)


def parse(data: dict[str, Any], file: str) -> LlavaVisionConfig:
    model_type, dtype, vision, v = vision_header(data, file, MODEL_TYPES)
    depth, layer = v("num_hidden_layers"), v("vision_feature_layer")
    num_layers = depth + 1 + layer if layer < 0 else layer
    if not 0 <= num_layers <= depth:
        raise EngineLoadError(file, f"{layer} selects no hidden state of a {depth}-layer tower",
                              "vision.vision_feature_layer")
    cfg = LlavaVisionConfig(
        model_type=model_type, dtype=dtype, out_hidden_size=get_field(data, "out_hidden_size", int, file),
        image_token_id=get_field(data, "image_token_id", int, file),
        preprocessing=_preprocessing(data, file), hidden_size=v("hidden_size"),
        intermediate_size=v("intermediate_size"), num_heads=v("num_attention_heads"), num_hidden_layers=depth,
        num_layers=num_layers, image_size=v("image_size"), patch_size=v("patch_size"),
        num_channels=v("num_channels"), layer_norm_eps=v("layer_norm_eps", float), hidden_act=v("hidden_act", str),
        select_strategy=v("vision_feature_select_strategy", str), projector_bias=_bool(vision, file),
        grid_pinpoints=_pinpoints(vision, model_type, file))
    _check(cfg, file)
    return cfg


def _check(cfg: LlavaVisionConfig, file: str) -> None:
    for key in ("out_hidden_size", "hidden_size", "intermediate_size", "num_heads", "image_size", "patch_size",
                "num_channels"):
        if getattr(cfg, key) < 1:
            raise EngineLoadError(file, f"must be >= 1, got {getattr(cfg, key)}", key)
    if cfg.hidden_size % cfg.num_heads:
        raise EngineLoadError(file, f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                              f"{cfg.num_heads}", "vision.num_attention_heads")
    if cfg.image_size % cfg.patch_size:
        raise EngineLoadError(file, f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}",
                              "vision.patch_size")
    if cfg.hidden_act not in TOWER_ACTS:
        raise EngineLoadError(file, f"must be one of {TOWER_ACTS}, got {cfg.hidden_act!r}", "vision.hidden_act")
    if cfg.select_strategy not in SELECT_STRATEGIES or (cfg.is_next and cfg.select_strategy != "default"):
        allowed = ("default",) if cfg.is_next else SELECT_STRATEGIES
        raise EngineLoadError(file, f"must be one of {allowed}, got {cfg.select_strategy!r}",
                              "vision.vision_feature_select_strategy")
    pre = cfg.preprocessing
    if pre["image_size"] != cfg.image_size:
        raise EngineLoadError(file, f"{pre['image_size']} disagrees with the tower's image_size {cfg.image_size}",
                              "preprocessing.image_size")
    if [list(p) for p in cfg.grid_pinpoints] != pre.get("image_grid_pinpoints", []):
        raise EngineLoadError(file, "disagrees with vision.image_grid_pinpoints", "preprocessing.image_grid_pinpoints")


def _bool(vision: dict[str, Any], file: str) -> bool:
    value = vision.get("multimodal_projector_bias")
    if not isinstance(value, bool):
        raise EngineLoadError(file, f"expected true or false, got {value!r}", "vision.multimodal_projector_bias")
    return value


def _preprocessing(data: dict[str, Any], file: str) -> dict[str, Any]:
    pre = object_field(data, "preprocessing", file)
    unknown = sorted(set(pre) - set(PREPROCESSING_KEYS))
    if unknown:
        raise EngineLoadError(file, "unknown key", f"preprocessing.{unknown[0]}")
    get_field(pre, "image_size", int, file, "preprocessing.")
    get_field(pre, "rescale_factor", float, file, "preprocessing.")
    check_mean_std(pre, file)
    return dict(pre)


def _pinpoints(vision: dict[str, Any], model_type: str, file: str) -> tuple[tuple[int, int], ...]:
    if model_type != "llava_next":
        return ()
    value = vision.get("image_grid_pinpoints")
    image_size = get_field(vision, "image_size", int, file, "vision.")
    ok = isinstance(value, list) and value and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                    and x % image_size == 0 for x in p) for p in value)
    if not ok:
        raise EngineLoadError(file, f"expected a non-empty list of [height, width] multiples of image_size "
                              f"({image_size}), got {value!r}", "vision.image_grid_pinpoints")
    return tuple((p[0], p[1]) for p in value)


def tensor_shapes(cfg: LlavaVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of vision/encoder.safetensors: CLIP names without `vision_model.`, `projector.*`,
    NeXT's `image_newline`; only the `num_layers` encoder layers the selected hidden state needs."""
    e, inter, t = cfg.hidden_size, cfg.intermediate_size, cfg.out_hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.class_embedding": (e,),
        "embeddings.patch_embedding.weight": (e, cfg.num_channels, cfg.patch_size, cfg.patch_size),
        "embeddings.position_embedding.weight": (cfg.patches_per_side ** 2 + 1, e),
        "pre_layrnorm.weight": (e,), "pre_layrnorm.bias": (e,),
        "projector.linear_1.weight": (t, e), "projector.linear_2.weight": (t, t),
    }
    if cfg.projector_bias:
        shapes.update({"projector.linear_1.bias": (t,), "projector.linear_2.bias": (t,)})
    if cfg.is_next:
        shapes["image_newline"] = (t,)
    for i in range(cfg.num_layers):
        p = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{p}self_attn.{name}.weight": (e, e), f"{p}self_attn.{name}.bias": (e,)})
        shapes.update({p + "layer_norm1.weight": (e,), p + "layer_norm1.bias": (e,),
                       p + "layer_norm2.weight": (e,), p + "layer_norm2.bias": (e,),
                       p + "mlp.fc1.weight": (inter, e), p + "mlp.fc1.bias": (inter,),
                       p + "mlp.fc2.weight": (e, inter), p + "mlp.fc2.bias": (e,)})
    return shapes


SCHEMA = VisionSchema(family="llava", model_types=MODEL_TYPES, llm_architectures=LLM_ARCHITECTURES,
                      parse=parse, tensor_shapes=tensor_shapes)
