"""LLaVA-1.5 / LLaVA-NeXT checkpoints -> engine directory: config, tensor names, HF reference, tiny presets.

What it is for: the family's `BuildFamily` (docs/design/families.md). Both
checkpoint layouts: transformers 5 in memory (`model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.image_newline`, `model.language_model.*`,
`lm_head.weight`) and llava-hf on the hub / what `save_pretrained` writes
(`vision_tower[.vision_model].*`, `multi_modal_projector.*`, `image_newline`,
`language_model.model.*`, `language_model.lm_head.weight`). Sparse hub configs
are resolved through transformers (LlamaConfig / CLIPVisionConfig defaults). The
language model is written as `LlamaForCausalLM` (Vicuna, or Mistral without a
sliding window). Tiny presets get the shared offline tokenizer plus `<image>` and
a Vicuna-style chat template (this project's own text; HF's llava-hf prompts
read `USER: <image>\\n... ASSISTANT:`, images before the text of a turn).
Not for: the generic conversion, export or validation stages (builder/convert.py,
vision_convert.py, vision_export.py, validate_vision.py).
"""
from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.convert import ConversionError
from builder.families.base import GridSets, HFTower, LLMKeys, OfflineTokens, preprocessing_params, wrapped_llm_keys
from engine_format.families.llava import PREPROCESSING_KEYS, LlavaVisionConfig, tensor_shapes

IMAGE_TOKEN = "<image>"
TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
NEWLINE_NAMES = ("model.image_newline", "image_newline")
# Image sizes (height, width in crop sides) of the parity feeds, one tuple per encoder call: several images
# per call, and at the tiny presets' and the real geometry NeXT grids of every pinpoint shape, some unpadded.
VALIDATION_SIZES = (((1.43, 1.07),), ((1.79, 3.21), (1.18, 2.5)), ((4.29, 1.43), (1.0, 1.0), (0.82, 3.46)))
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '\\n' }}"
    "{% else %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>{{ '\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}"
    "{% if not loop.last %} {% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaBuildFamily:
    name = "llava"
    hf_architectures = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
    preprocessing_keys = PREPROCESSING_KEYS
    special_tokens = {"image_token_index": IMAGE_TOKEN}
    offline_tokenizer = OfflineTokens((IMAGE_TOKEN,), CHAT_TEMPLATE)

    def validation_grids(self, cfg: LlavaVisionConfig) -> GridSets:
        """Parity feeds: images of VALIDATION_SIZES (in crop sides) per call, as grids of this config (NeXT's
        crop grid from transformers' own select_best_resolution)."""
        from transformers.image_processing_utils import select_best_resolution

        side, patches = cfg.image_size, cfg.patches_per_side
        sets = []
        for sizes in VALIDATION_SIZES:
            grids = []
            for h, w in sizes:
                height, width = round(h * side), round(w * side)
                if cfg.is_next:
                    best_h, best_w = select_best_resolution((height, width), [list(p) for p in cfg.grid_pinpoints])
                    rows, cols = best_h // side, best_w // side
                    grids.append((1 + rows * cols, patches, patches, height, width, rows, cols))
                else:
                    grids.append((1, patches, patches))
            sets.append(tuple(grids))
        return tuple(sets)

    def llm_architecture(self, hf_config: dict[str, Any]) -> str:
        text = self.text_config(hf_config)
        if text.get("model_type") not in ("llama", "mistral"):
            raise ConversionError(f"config.json: text_config.model_type {text.get('model_type')!r} is not supported "
                                  "(llama, mistral)")
        if text.get("sliding_window") is not None:
            raise ConversionError(f"config.json: text_config.sliding_window {text['sliding_window']} is not "
                                  "supported (a Llama-shaped Mistral has none)")
        return "LlamaForCausalLM"

    def text_config(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        resolved = _resolved(hf_config)
        return {**resolved.text_config.to_dict(), "tie_word_embeddings": bool(resolved.tie_word_embeddings)}

    def llm_keys(self, hf_names: Collection[str]) -> LLMKeys:
        return wrapped_llm_keys(hf_names, "LLaVA")

    def vision_config_json(self, hf_dir: Path, dtype: str, preset_preprocessing: dict[str, Any] | None
                           ) -> dict[str, Any]:
        from engine_format.llm_config import SHORT_DTYPES

        raw = json.loads((hf_dir / "config.json").read_text())
        hf = _resolved(raw)
        v = hf.vision_config
        if v.model_type != "clip_vision_model":
            raise ConversionError(f"config.json: vision_config.model_type {v.model_type!r} is not supported "
                                  "(clip_vision_model)")
        if not isinstance(hf.vision_feature_layer, int):
            raise ConversionError(f"config.json: vision_feature_layer {hf.vision_feature_layer!r}: only one layer "
                                  "(an integer) is supported")
        if hf.projector_hidden_act != "gelu":
            raise ConversionError(f"config.json: projector_hidden_act {hf.projector_hidden_act!r} is not supported "
                                  "(gelu)")
        vision: dict[str, Any] = {
            key: getattr(v, key) for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_hidden_layers", "image_size", "patch_size", "num_channels",
                                             "layer_norm_eps", "hidden_act")}
        vision.update(vision_feature_layer=hf.vision_feature_layer,
                      vision_feature_select_strategy=hf.vision_feature_select_strategy,
                      multimodal_projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)))
        if hf.model_type == "llava_next":
            vision["image_grid_pinpoints"] = [list(p) for p in hf.image_grid_pinpoints]
        return {"model_type": hf.model_type, "dtype": SHORT_DTYPES[dtype], "vision": vision,
                "out_hidden_size": hf.text_config.hidden_size, "image_token_id": hf.image_token_id,
                "preprocessing": preprocessing_params(hf_dir, preset_preprocessing,
                                                      lambda path, raw: _preprocessing(path, raw, vision))}

    def vision_tensors(self, hf: Mapping[str, torch.Tensor], cfg: LlavaVisionConfig) -> dict[str, torch.Tensor]:
        wanted = tensor_shapes(cfg)
        out: dict[str, torch.Tensor] = {}
        for key, tensor in hf.items():
            name = engine_name(key)
            if name is not None and name in wanted:    # later encoder layers and post_layernorm are unused
                out[name] = tensor
        return out

    def hf_preprocessor_config(self, preprocessing: dict[str, Any]) -> dict[str, Any]:
        side = preprocessing["image_size"]
        next_ = bool(preprocessing.get("image_grid_pinpoints"))
        out = {"image_processor_type": "LlavaNextImageProcessor" if next_ else "CLIPImageProcessor",
               "processor_class": "LlavaNextProcessor" if next_ else "LlavaProcessor",
               "do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
               "do_convert_rgb": True, "resample": 3, "size": {"shortest_edge": side},
               "crop_size": {"height": side, "width": side}, "image_mean": preprocessing["image_mean"],
               "image_std": preprocessing["image_std"], "rescale_factor": preprocessing["rescale_factor"]}
        if next_:
            out["image_grid_pinpoints"] = preprocessing["image_grid_pinpoints"]
        if preprocessing.get("do_pad"):
            out.update(image_processor_type="LlavaImageProcessor", do_pad=True)
        return out

    def transformers_checkpoint(self, hf_dir: Path, cache_dir: Path) -> Path:
        return hf_dir           # both layouts load in transformers

    def hf_tower(self, hf_dir: Path, cfg: LlavaVisionConfig) -> HFTower:
        model = hf_vision_model(hf_dir, getattr(torch, cfg.dtype))

        def forward(feed: dict[str, torch.Tensor]) -> torch.Tensor:
            grids = [tuple(int(x) for x in g) for g in feed["grid_thw"]]
            crops = [g[0] for g in grids]
            if cfg.is_next:
                pixels = feed["pixel_values"].split(crops)
                padded = torch.zeros(len(crops), max(crops), *pixels[0].shape[1:])
                for i, p in enumerate(pixels):
                    padded[i, :len(p)] = p
                sizes = torch.tensor([[g[3], g[4]] for g in grids])
                rows = model.get_image_features(padded, sizes).pooler_output
            else:
                rows = model.get_image_features(feed["pixel_values"]).pooler_output
            return torch.cat([r.reshape(-1, cfg.out_hidden_size) for r in rows]).float()

        s = cfg.image_size
        return HFTower(inputs=(("pixel_values", np.float32, (-1, cfg.num_channels, s, s)),
                               ("grid_thw", np.int64, (-1, 7 if cfg.is_next else 3))), forward=forward)


def _preprocessing(path: Path, raw: dict[str, Any], vision: dict[str, Any]) -> dict[str, Any]:
    """Preprocessing parameters from the checkpoint's preprocessor_config.json (`raw`, read from `path`)."""
    size, crop = (raw.get("size") or {}).get("shortest_edge"), raw.get("crop_size") or {}
    side = vision["image_size"]
    if size != side or crop.get("height", side) != side or crop.get("width", side) != side:
        raise ConversionError(f"{path}: size.shortest_edge {size} / crop_size {crop} must equal the tower's "
                              f"image_size {side} (the only geometry LLaVA checkpoints use)")
    if raw.get("resample", 3) != 3 or not raw.get("do_resize", True) or not raw.get("do_normalize", True):
        raise ConversionError(f"{path}: only bicubic (resample 3) resize and normalisation are supported")
    return {"image_size": side, "image_mean": raw["image_mean"], "image_std": raw["image_std"],
            "rescale_factor": raw.get("rescale_factor", 1 / 255), "do_pad": bool(raw.get("do_pad", False))
            and raw.get("image_processor_type") == "LlavaImageProcessor",
            "image_grid_pinpoints": vision.get("image_grid_pinpoints", [])}


def engine_name(key: str) -> str | None:
    """The engine name of an HF vision / projector / newline tensor in either layout; None for others."""
    for prefix in TOWER_PREFIXES:
        if key.startswith(prefix):
            name = key[len(prefix):]
            return name[len("vision_model."):] if name.startswith("vision_model.") else name
    for prefix in PROJECTOR_PREFIXES:
        if key.startswith(prefix):
            return "projector." + key[len(prefix):]
    return "image_newline" if key in NEWLINE_NAMES else None


def _resolved(hf_config: dict[str, Any]) -> Any:
    """transformers' LlavaConfig / LlavaNextConfig of a config.json dict (sub-config defaults filled)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        return AutoConfig.for_model(hf_config.get("model_type"), **fields)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"config.json: not a valid {hf_config.get('model_type')} config ({exc})") from None


def hf_vision_model(hf_dir: Path, dtype: torch.dtype) -> Any:
    """transformers' LlavaModel / LlavaNextModel with only the tower, projector and newline materialised
    (the checkpoint's tensors rounded to `dtype`, in float32); the language model stays on the meta device."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel, LlavaModel, LlavaNextModel

    config = AutoConfig.from_pretrained(str(hf_dir))
    model_class = {"llava": LlavaModel, "llava_next": LlavaNextModel}[config.model_type]
    with torch.device("meta"):
        model = model_class(config)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name = engine_name(key)
                if name is not None:
                    state[name] = f.get_tensor(key).to(dtype).float()
    tower = {k: v for k, v in state.items() if not k.startswith("projector.") and k != "image_newline"}
    # the tower and projector are built on the CPU (their non-persistent buffers, such as CLIP's
    # position_ids, initialised), then given the checkpoint's tensors
    model.vision_tower = AutoModel.from_config(config.vision_config, dtype=torch.float32)
    model.vision_tower.load_state_dict(_with_inner_prefix(model.vision_tower, tower), strict=True)
    model.multi_modal_projector = type(model.multi_modal_projector)(config).float()
    model.multi_modal_projector.load_state_dict(
        {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}, strict=True)
    if config.model_type == "llava_next":
        model.image_newline = torch.nn.Parameter(state["image_newline"])
    return model.eval()


def _with_inner_prefix(tower: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPVisionModel's own state-dict names (with or without `vision_model.`)."""
    inner = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""
    return {inner + k: v for k, v in state.items()}


FAMILY = LlavaBuildFamily()
