"""Helpers for the InternVL2.5 tests: transformers' own InternVL processor over a built engine's files.

What it is for: the reference prompt of HF's `InternVLProcessor` (tokenizer + `GotOcr2ImageProcessorPil`,
the image processor transformers pairs with InternVL) for chat messages, built offline from the engine's
source checkpoint. transformers' InternVL video processor needs torchvision (not installable here), so the
processor is built without one (its class check is skipped for that one missing part) and videos are
expanded by the processor's own `replace_video_token` over frames preprocessed as single tiles.
Not for: running models (tests/runtime/test_internvl_engine.py does).
"""
from __future__ import annotations

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
