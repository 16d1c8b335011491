"""Helpers for the InternVL2.5 tests: transformers' own InternVL processor over a built engine's files.

What it is for: the reference prompt of HF's `InternVLProcessor` (tokenizer + `GotOcr2ImageProcessorPil`,
the image processor transformers pairs with InternVL) for chat messages, built offline from the engine's
source checkpoint. transformers' InternVL video processor needs torchvision (not installable here), so the
processor is built without one (its class check is skipped for that one missing part) and videos are
expanded by the processor's own `replace_video_token` over frames preprocessed as single tiles.
Also the -hf tower's tensors under OpenGVLab's original names (the layout tests' third hub layout).
Not for: running models (tests/runtime/test_internvl_engine.py does).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EXTRA_SPECIAL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def hf_internvl_processor(hf_dir: Path, tokens_per_tile: int):
    """transformers' InternVLProcessor for a checkpoint directory, without the (torchvision) video processor."""
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):   # noqa: ANN001, ANN202
            if argument is not None:
                return super().check_argument_for_proper_class(argument_name, argument)
            return None

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), extra_special_tokens=EXTRA_SPECIAL_TOKENS)
    image_processor = GotOcr2ImageProcessorPil.from_pretrained(str(hf_dir))
    return ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                      image_seq_length=tokens_per_tile, chat_template=tokenizer.chat_template)


@dataclass
class HFPrompt:
    input_ids: torch.Tensor          # [1, L]
    pixel_values: torch.Tensor | None


def hf_prompt(processor, messages: list[dict], video_tiles: np.ndarray | None = None) -> HFPrompt:
    """What HF's processor gives for `messages` (runtime content parts: text / image PIL / video frames).
    A video becomes processor.replace_video_token's text over `video_tiles` [frames, 3, S, S]."""
    images = [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
              if p["type"] == "image"]
    stripped = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                 [{"type": p["type"], "text": p.get("text", "")} for p in m["content"]]} for m in messages]
    text = processor.apply_chat_template(stripped, tokenize=False, add_generation_prompt=True)
    pixels = []
    if video_tiles is not None:
        text = text.replace(processor.video_token,
                            processor.replace_video_token({"pixel_values_videos": [video_tiles]}, 0), 1)
    if images:
        out = processor(text=[text], images=images, return_tensors="pt")
        input_ids, pixels = out["input_ids"], [out["pixel_values"]]
    else:
        input_ids = processor.tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
    if video_tiles is not None:
        pixels.append(torch.from_numpy(video_tiles))
    return HFPrompt(input_ids, torch.cat(pixels) if pixels else None)


def write_opengvlab_checkpoint(hf_dir: Path, out: Path) -> Path:
    """The checkpoint in `hf_dir` (transformers' -hf layout, as save_pretrained writes it) rewritten in OpenGVLab's
    original layout: config.json of `InternVLChatModel` (model_type internvl_chat, llm_config, vision_config with
    qkv_bias), tensors `vision_model.*` (fused attn.qkv, ls1 / ls2, norm1 / norm2), `mlp1.{0,1,3}.*`,
    `language_model.*`, and OpenGVLab's CLIP-style preprocessor_config.json. Names written out by hand."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    config = json.loads((hf_dir / "config.json").read_text())
    pre = json.loads((hf_dir / "preprocessor_config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    v = config["vision_config"]
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(hf_dir / name, out / name)
    text = {**config["text_config"], "architectures": ["Qwen2ForCausalLM"]}
    vision = {k: v[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "image_size", "patch_size", "layer_norm_eps", "hidden_act", "norm_type")}
    vision.update(qkv_bias=v["attention_bias"], qk_normalization=False, image_size=v["image_size"][0],
                  patch_size=v["patch_size"][0], model_type="intern_vit_6b", architectures=["InternVisionModel"])
    (out / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "llm_config": text,
        "vision_config": vision, "downsample_ratio": config["downsample_ratio"], "template": "internvl2_5",
        "select_layer": -1, "ps_version": "v2", "dynamic_image_size": True, "use_thumbnail": True,
        "min_dynamic_patch": pre["min_patches"], "max_dynamic_patch": pre["max_patches"],
        "force_image_size": vision["image_size"], "tie_word_embeddings": config["tie_word_embeddings"]}))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": vision["image_size"], "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": pre["image_mean"],
        "image_std": pre["image_std"], "resample": 3, "size": vision["image_size"]}))
    state = {k: t for k, t in sd.items() if k.startswith("language_model.")}
    state.update(opengvlab_tower_state(sd, "", v["num_hidden_layers"]))
    save_file({k: t.contiguous() for k, t in state.items()}, str(out / "model.safetensors"))
    return out


def opengvlab_tower_state(sd: Mapping[str, torch.Tensor], prefix: str, num_layers: int) -> dict[str, torch.Tensor]:
    """The tower and projector of a transformers state dict (their names under `prefix`: "" as save_pretrained
    writes them, "model." in memory) under OpenGVLab's names, written out by hand (qkv fused on the output dim)."""
    tower, projector = f"{prefix}vision_tower.", f"{prefix}multi_modal_projector."
    out = {"vision_model.embeddings.class_embedding": sd[tower + "embeddings.cls_token"],
           "vision_model.embeddings.position_embedding": sd[tower + "embeddings.position_embeddings"]}
    for kind in ("weight", "bias"):
        out[f"vision_model.embeddings.patch_embedding.{kind}"] = \
            sd[f"{tower}embeddings.patch_embeddings.projection.{kind}"]
        for ours, hf in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
            out[f"mlp1.{ours}.{kind}"] = sd[f"{projector}{hf}.{kind}"]
    for i in range(num_layers):
        src, dst = f"{tower}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        out[dst + "ls1"], out[dst + "ls2"] = sd[src + "lambda_1"], sd[src + "lambda_2"]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([sd[f"{src}attention.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{dst}attn.proj.{kind}"] = sd[f"{src}attention.projection_layer.{kind}"]
            out[f"{dst}norm1.{kind}"] = sd[f"{src}layernorm_before.{kind}"]
            out[f"{dst}norm2.{kind}"] = sd[f"{src}layernorm_after.{kind}"]
            for fc in ("fc1", "fc2"):
                out[f"{dst}mlp.{fc}.{kind}"] = sd[f"{src}mlp.{fc}.{kind}"]
    return out
