"""Helpers for the vision-language engine tests: synthetic images, a user turn from its parts, the runtime's
processor for an engine; and for Qwen2-VL / Qwen2.5-VL, HF inputs built the HF way."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine_format.engine_dir import LoadedEngine
from runtime.families.qwen2_vl import IMAGE_PAD, VIDEO_PAD
from runtime.multimodal.image_io import ImageLimits
from runtime.multimodal.processor import MultimodalProcessor
from runtime.families.qwen2_vl.preprocess import PreprocessConfig, preprocess_video
from tests.conftest import hf_dir_of

VL_PRESETS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    """A smooth random RGB image (noise upsampled), so resizing keeps some structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def noise_frames(seed: int, num: int, width: int, height: int) -> list[Image.Image]:
    return [noise_image(seed * 100 + i, width, height) for i in range(num)]


def user_turn(*parts: object) -> list[dict]:
    """Chat messages of one user turn: a str is text, a list of frames a video at 2 fps, anything else an image."""
    content: list[dict] = []
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        elif isinstance(part, list):
            content.append({"type": "video", "video": part, "fps": 2.0})
        else:
            content.append({"type": "image", "image": part})
    return [{"role": "user", "content": content}]


def vl_processor(engine: LoadedEngine) -> MultimodalProcessor:
    """The runtime's processor for `engine`: its own tokenizer, the default image limits."""
    from transformers import AutoTokenizer

    return MultimodalProcessor(engine, AutoTokenizer.from_pretrained(str(engine.tokenizer_dir)), ImageLimits())


@dataclass
class HFInputs:
    input_ids: torch.Tensor
    kwargs: dict


def hf_inputs(engine: LoadedEngine, tokenizer, messages: list[dict]) -> HFInputs:
    """What HF's Qwen2-VL processor would give: HF's image processor for images, the chat template of
    our tokenizer, pads expanded in the text, `mm_token_type_ids`. Videos use our frame preprocessing
    (HF's video processor needs torchvision, which this environment lacks) with HF's fps rule."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    vision = engine.vision.config
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(hf_dir_of(engine.root)))
    preprocess = PreprocessConfig.from_dict(vision.preprocessing)
    images = [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
              if p["type"] == "image"]
    videos = [(p["video"], p["fps"]) for m in messages if isinstance(m["content"], list) for p in m["content"]
              if p["type"] == "video"]
    stripped = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                 [{"type": p["type"], "text": p.get("text", "")} for p in m["content"]]} for m in messages]
    text = tokenizer.apply_chat_template(stripped, tokenize=False, add_generation_prompt=True)
    kwargs: dict = {}
    merge = vision.spatial_merge_size ** 2
    if images:
        out = image_processor(images=images, return_tensors="pt")
        kwargs.update(pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"])
        for grid in out["image_grid_thw"]:
            text = text.replace(IMAGE_PAD, "<|placeholder|>" * (int(grid.prod()) // merge), 1)
        text = text.replace("<|placeholder|>", IMAGE_PAD)
    if videos:
        processed = [preprocess_video(frames, preprocess, fps) for frames, fps in videos]
        kwargs.update(pixel_values_videos=torch.from_numpy(np.concatenate([v.pixel_values for v in processed])),
                      video_grid_thw=torch.tensor([v.grid_thw for v in processed]))
        if vision.model_type == "qwen2_5_vl":
            kwargs["second_per_grid_ts"] = torch.tensor([preprocess.temporal_patch_size / fps for _, fps in videos])
        for v in processed:
            text = text.replace(VIDEO_PAD, "<|placeholder|>" * v.num_tokens, 1)
        text = text.replace("<|placeholder|>", VIDEO_PAD)
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    if images or videos:
        types = torch.zeros_like(input_ids)
        types[input_ids == vision.image_token_id] = 1
        types[input_ids == vision.video_token_id] = 2
        kwargs["mm_token_type_ids"] = types
    return HFInputs(input_ids, kwargs)


def hf_generate(model, inputs: HFInputs, max_new_tokens: int, pad_token_id: int | None
                ) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of every generated position [max_new_tokens, vocab]."""
    with torch.inference_mode():
        out = model.generate(inputs.input_ids, attention_mask=torch.ones_like(inputs.input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
                             return_dict_in_generate=True, output_logits=True, **inputs.kwargs)
    tokens = out.sequences[0, inputs.input_ids.shape[1]:].tolist()
    return tokens, torch.stack([step[0] for step in out.logits]).float()
