"""InternVL2.5 checkpoints -> engine directory: config, tensor names (three layouts), HF reference, tiny presets.

What it is for: the family's `BuildFamily` (docs/design/families.md). Three tensor
layouts are read: transformers 5 in memory (`model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`), what
`save_pretrained` writes and the `-hf` hub repositories hold (`vision_tower.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`),
and OpenGVLab's original layout (`InternVLChatModel`, config model_type `internvl_chat`
with `llm_config`: `vision_model.*` with a fused `attn.qkv`, `mlp1.{0,1,3}`,
`language_model.model.*`), renamed as transformers' conversion script does. Engine
names are the `-hf` ones (engine_format/families/internvl.py). The language model is
written as its own architecture (`Qwen2ForCausalLM`, `LlamaForCausalLM`; 1-D RoPE).
Tiny presets get the shared offline tokenizer plus InternVL's special tokens and the
chat template of transformers' InternVL conversion.
Not for: InternLM2 language models (InternVL2.5-2B / -8B: a fused `wqkv` layout),
InternViT-6B's QK norm, or the generic conversion / export / validation stages.
"""
from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.convert import ConversionError
from builder.families.base import (PREPROCESSOR_FILE, HFTower, LLMKeys, OfflineTokens, preprocessing_params,
                                   wrapped_llm_keys)
from engine_format.families.internvl import InternVLVisionConfig
from engine_format.llm_config import SHORT_DTYPES

PREPROCESSING_KEYS = ("tile_size", "patch_size", "min_tiles", "max_tiles", "use_thumbnail", "image_mean",
                      "image_std", "rescale_factor")
IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
# The hub tokenizers' order (151665..151673 there), then the `<video>` marker of transformers' template.
SPECIAL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", VIDEO)
TOKEN_TEXTS = {"image_token_id": IMG_CONTEXT, "image_start_token_id": IMG_START, "image_end_token_id": IMG_END,
               "video_token_id": VIDEO}
# transformers' InternVL conversion template: an image part renders `<IMG_CONTEXT>\n`, a video part `<video>\n`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
OPENGVLAB = "internvl_chat"
LLM_TYPES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
ARCHITECTURE_OF = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
# OpenGVLab vision names -> engine names, applied in order (transformers' conversion script's renames).
_OPENGVLAB_VISION = (
    (r"^vision_model\.", "vision_tower."), (r"\.layers\.", ".layer."), (r"class_embedding$", "cls_token"),
    (r"position_embedding$", "position_embeddings"), (r"patch_embedding\.", "patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"), (r"\.attn\.proj\.", ".attention.projection_layer."), (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."), (r"\.norm2\.", ".layernorm_after."),
)
_OPENGVLAB_PROJECTOR = {"mlp1.0.": "layer_norm.", "mlp1.1.": "linear_1.", "mlp1.3.": "linear_2."}


class InternVLBuildFamily:
    name = "internvl"
    hf_architectures = {"internvl": "InternVLForConditionalGeneration", OPENGVLAB: "InternVLChatModel"}
    preprocessing_keys = PREPROCESSING_KEYS
    special_tokens = {"image_token_id": IMG_CONTEXT}
    offline_tokenizer = OfflineTokens(SPECIAL_TOKENS, CHAT_TEMPLATE)

    @staticmethod
    def validation_grids(cfg: InternVLVisionConfig) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        """Feeds of the parity check, one encoder call each: one tile; a 4-tile image + thumbnail and a
        frame; the largest image (12 tiles + thumbnail)."""
        s = cfg.patches_per_side
        return (((1, s, s),), ((5, s, s), (1, s, s)), ((13, s, s),))

    def llm_architecture(self, hf_config: dict[str, Any]) -> str:
        model_type = self.text_config(hf_config).get("model_type")
        if model_type not in ARCHITECTURE_OF:
            raise ConversionError(f"config.json: language model type {model_type!r} is not supported for InternVL "
                                  f"({', '.join(ARCHITECTURE_OF)}; InternLM2 language models are not)")
        return ARCHITECTURE_OF[model_type]

    def text_config(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        hf = normalized_config(hf_config)
        text = dict(hf.get("text_config") or {})
        return {**text, "tie_word_embeddings": bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings")))}

    def llm_keys(self, hf_names: Collection[str]) -> LLMKeys:
        return wrapped_llm_keys(hf_names, "InternVL")

    def vision_config_json(self, hf_dir: Path, dtype: str, preset_preprocessing: dict[str, Any] | None
                           ) -> dict[str, Any]:
        hf = normalized_config(json.loads((hf_dir / "config.json").read_text()))
        v = hf.get("vision_config") or {}
        for key, want in (("norm_type", "layer_norm"), ("use_qk_norm", False), ("use_mean_pooling", True),
                          ("hidden_act", "gelu")):
            if v.get(key, want) != want:
                raise ConversionError(f"config.json: vision_config.{key} {v[key]!r} is not supported ({want!r})")
        for key, want in (("vision_feature_layer", -1), ("vision_feature_select_strategy", "default"),
                          ("projector_hidden_act", "gelu")):
            if hf.get(key, want) != want:
                raise ConversionError(f"config.json: {key} {hf[key]!r} is not supported ({want!r})")
        size, patch = _side(v.get("image_size", 448)), _side(v.get("patch_size", 14))
        vision = {"hidden_size": v.get("hidden_size", 1024), "num_hidden_layers": v.get("num_hidden_layers", 24),
                  "num_attention_heads": v.get("num_attention_heads", 16),
                  "intermediate_size": v.get("intermediate_size", 4096), "hidden_act": "gelu",
                  "layer_norm_eps": float(v.get("layer_norm_eps", 1e-6)),
                  "attention_bias": bool(v.get("attention_bias", False)), "image_size": size, "patch_size": patch,
                  "num_channels": v.get("num_channels", 3)}
        return {"model_type": "internvl", "dtype": SHORT_DTYPES[dtype], "vision": vision,
                "downsample_ratio": float(hf.get("downsample_ratio", 0.5)), "projector_hidden_act": "gelu",
                "out_hidden_size": int(self.text_config(hf)["hidden_size"]), **_token_ids(hf_dir),
                "preprocessing": _preprocessing(hf_dir, preset_preprocessing, size, patch)}

    def vision_tensors(self, hf: Mapping[str, torch.Tensor], cfg: InternVLVisionConfig) -> dict[str, torch.Tensor]:
        return engine_tensors(hf, cfg.hidden_size)

    def hf_preprocessor_config(self, preprocessing: dict[str, Any]) -> dict[str, Any]:
        side = preprocessing["tile_size"]
        return {"image_processor_type": "GotOcr2ImageProcessor", "processor_class": "InternVLProcessor",
                "crop_to_patches": True, "min_patches": preprocessing["min_tiles"],
                "max_patches": preprocessing["max_tiles"], "size": {"height": side, "width": side},
                "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
                "image_mean": preprocessing["image_mean"], "image_std": preprocessing["image_std"],
                "rescale_factor": preprocessing["rescale_factor"]}

    def transformers_checkpoint(self, hf_dir: Path, cache_dir: Path) -> Path:
        """OpenGVLab's layout (custom code in the hub repository) -> a -hf copy, made once per config + weights."""
        config = json.loads((hf_dir / "config.json").read_text())
        if config.get("model_type") != OPENGVLAB:
            return hf_dir
        return convert_opengvlab(hf_dir, config, cache_dir)

    def hf_tower(self, hf_dir: Path, cfg: InternVLVisionConfig) -> HFTower:
        model = hf_vision_model(hf_dir, getattr(torch, cfg.dtype))

        def forward(feed: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.inference_mode():
                rows = model.get_image_features(pixel_values=feed["pixel_values"], vision_feature_layer=-1,
                                                vision_feature_select_strategy="default").pooler_output
            return rows.reshape(-1, cfg.out_hidden_size).float()

        s = cfg.image_size
        return HFTower(inputs=(("pixel_values", np.float32, (-1, cfg.num_channels, s, s)),
                               ("grid_thw", np.int64, (-1, 3))), forward=forward)


def engine_name(key: str) -> str | None:
    """The engine name of an HF tower / projector tensor in any of the three layouts; None for others.
    OpenGVLab's fused `attn.qkv` keeps its name here (`attention.qkv`); vision_tensors splits it."""
    for prefix in ("model.", ""):
        for part in ("vision_tower.", "multi_modal_projector."):
            if key.startswith(prefix + part):
                return key[len(prefix):]
    if key.startswith("vision_model."):
        for pattern, repl in _OPENGVLAB_VISION:
            key = re.sub(pattern, repl, key)
        return key
    head = key[:len("mlp1.0.")]
    return "multi_modal_projector." + _OPENGVLAB_PROJECTOR[head] + key[len(head):] \
        if head in _OPENGVLAB_PROJECTOR else None


def engine_tensors(hf: Mapping[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Engine names -> tensors of the tower and projector (any layout; OpenGVLab's qkv split in three)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf.items():
        name = engine_name(key)
        if name is None:
            continue
        if ".attention.qkv." not in name:
            out[name] = tensor
            continue
        if tensor.shape[0] != 3 * width:
            raise ConversionError(f"{key}: expected {3 * width} rows (3 x vision hidden_size), got {tensor.shape[0]}")
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.split(width, dim=0)):
            out[name.replace(".qkv.", f".{part}.")] = chunk
    return out


def convert_opengvlab(hf_dir: Path, config: dict[str, Any], cache_dir: Path) -> Path:
    """Write an OpenGVLab InternVL checkpoint in transformers' -hf layout (config.json, model.safetensors with
    save_pretrained's names, the tokenizer with transformers' InternVL chat template, a GotOcr2
    preprocessor_config.json) under cache_dir."""
    import hashlib
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import InternVLConfig

    weights = sorted(hf_dir.glob("*.safetensors"))
    if not weights:
        raise ConversionError(f"{hf_dir}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    digest = hashlib.sha256((hf_dir / "config.json").read_bytes())
    for path in weights:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    out = cache_dir / "converted-checkpoints" / f"internvl-hf-{digest.hexdigest()[:16]}"
    if (out / "model.safetensors").is_file():
        return out
    hf = normalized_config(config)
    width = int(hf["vision_config"].get("hidden_size", 1024))
    state: dict[str, torch.Tensor] = {}
    for path in weights:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.startswith(("language_model.model.", "language_model.lm_head.")):
                    state[key] = f.get_tensor(key)
                elif engine_name(key) is None:
                    raise ConversionError(f"OpenGVLab tensor {key!r} is not part of an InternVL checkpoint")
                else:
                    state.update(engine_tensors({key: f.get_tensor(key)}, width))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The tokenizer, with transformers' InternVL chat template (image parts -> <IMG_CONTEXT>), as transformers'
    # conversion script gives it: OpenGVLab's own template renders string contents only.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(tmp))
    ids = _token_ids(hf_dir)
    side = _side(hf["vision_config"].get("image_size", 448))
    fields = {k: v for k, v in hf.items() if k not in ("model_type", "architectures")}
    hf_config = InternVLConfig(**fields, image_token_id=ids["image_token_id"],
                               image_seq_length=(side // _side(hf["vision_config"].get("patch_size", 14)) // 2) ** 2)
    hf_config.architectures = ["InternVLForConditionalGeneration"]
    hf_config.save_pretrained(str(tmp))
    preprocessing = _preprocessing(hf_dir, None, side, _side(hf["vision_config"].get("patch_size", 14)))
    (tmp / PREPROCESSOR_FILE).write_text(json.dumps(FAMILY.hf_preprocessor_config(preprocessing), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if not out.exists():
        tmp.replace(out)
    return out


def normalized_config(config: dict[str, Any]) -> dict[str, Any]:
    """transformers' InternVL config.json fields for either config layout (OpenGVLab's renamed and checked)."""
    if config.get("model_type") != OPENGVLAB:
        return config
    llm = dict(config.get("llm_config") or {})
    arch = (llm.get("architectures") or [None])[0]
    if arch not in LLM_TYPES:
        raise ConversionError(f"config.json: llm_config.architectures {arch!r} is not supported for InternVL "
                              f"({', '.join(LLM_TYPES)}; InternLM2 language models are not)")
    for key, want in (("ps_version", "v2"), ("select_layer", -1)):
        if config.get(key, want) != want:
            raise ConversionError(f"config.json: {key} {config[key]!r} is not supported ({want!r})")
    vision = dict(config.get("vision_config") or {})
    vision["use_qk_norm"] = bool(vision.pop("qk_normalization", False))
    vision["attention_bias"] = bool(vision.pop("qkv_bias", False))
    return {"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"],
            "text_config": {**llm, "model_type": LLM_TYPES[arch]}, "vision_config": vision,
            "downsample_ratio": config.get("downsample_ratio", 0.5), "projector_hidden_act": "gelu",
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", llm.get("tie_word_embeddings", False)))}


def hf_vision_model(hf_dir: Path, dtype: torch.dtype) -> Any:
    """transformers' InternVLModel with only the tower and projector materialised (the checkpoint's tensors,
    any layout, rounded to `dtype`, computing in float32); the language model stays on the meta device."""
    from safetensors import safe_open
    from transformers import InternVLConfig, InternVLModel

    hf = normalized_config(json.loads((hf_dir / "config.json").read_text()))
    config = InternVLConfig(**{k: v for k, v in hf.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        model = InternVLModel(config)
    raw: dict[str, torch.Tensor] = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            raw.update({key: f.get_tensor(key) for key in f.keys() if engine_name(key) is not None})
    width = config.vision_config.hidden_size
    state = {name: t.to(dtype).float() for name, t in engine_tensors(raw, width).items()}
    for part in ("vision_tower", "multi_modal_projector"):
        module = getattr(model, part)
        module.to_empty(device="cpu")
        module.load_state_dict({k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")},
                               strict=True)
    return model.eval()


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _token_ids(hf_dir: Path) -> dict[str, int]:
    """The image tokens' ids in the checkpoint's tokenizer (`<video>` only where the tokenizer has it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    vocab = tokenizer.get_vocab()
    ids = {key: vocab[text] for key, text in TOKEN_TEXTS.items() if text in vocab}
    missing = [TOKEN_TEXTS[k] for k in ("image_token_id", "image_start_token_id", "image_end_token_id") if k not in ids]
    if missing:
        raise ConversionError(f"{hf_dir}: the tokenizer has no {', '.join(missing)} token (InternVL's image tokens)")
    return ids


def _preprocessing(hf_dir: Path, preset: dict[str, Any] | None, size: int, patch: int) -> dict[str, Any]:
    """Tiling parameters: the checkpoint's preprocessor_config.json wins, else the preset's block."""
    return preprocessing_params(hf_dir, preset, lambda path, raw: _tiling(hf_dir, path, raw, size, patch))


def _tiling(hf_dir: Path, path: Path, raw: dict[str, Any], size: int, patch: int) -> dict[str, Any]:
    """Tiling parameters from the checkpoint's preprocessor_config.json (`raw`, read from `path`) and config.json."""
    hf_size = raw.get("size") or {}
    side = hf_size.get("height", size) if isinstance(hf_size, dict) else int(hf_size)
    if raw.get("image_processor_type", "").startswith("GotOcr2"):     # transformers' InternVL processor
        tiles = (raw.get("min_patches", 1), raw.get("max_patches", 12))
        if not raw.get("crop_to_patches", False):
            tiles = (1, 1)
        thumbnail = True        # GotOcr2 always adds it to a grid of several tiles
    else:      # OpenGVLab's CLIP-style file: the tiling lives in config.json
        config = json.loads((hf_dir / "config.json").read_text())
        tiles = (config.get("min_dynamic_patch", 1), config.get("max_dynamic_patch", 12))
        if not config.get("dynamic_image_size", True):
            tiles = (1, 1)
        thumbnail = bool(config.get("use_thumbnail", True))
    if side != size or raw.get("resample", 3) != 3:
        raise ConversionError(f"{path}: size {side} must equal the tower's image_size {size}, resample bicubic (3)")
    return {"tile_size": side, "patch_size": patch, "min_tiles": tiles[0], "max_tiles": tiles[1],
            "use_thumbnail": thumbnail,
            "image_mean": raw.get("image_mean"), "image_std": raw.get("image_std"),
            "rescale_factor": raw.get("rescale_factor", 1 / 255)}


FAMILY = InternVLBuildFamily()
