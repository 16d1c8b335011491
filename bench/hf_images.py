"""HF baseline prompts with images: each family's pixels and placeholder tokens from HF's own processors.

What it is for: `image_prompts_for`, which picks, by the HF config's model_type, how
the baseline turns a batch of bench requests with images into prompt ids and the
pixel tensors HF `generate` takes, so that HF gets the same images and the same
number of prompt tokens as the server builds for the same request. The server's
text prompt with images (native API: text + images, no placeholder in the text)
puts one vision block per image first, then the text; every family here mirrors
that. Qwen2-VL: `<|vision_start|>` + one `<|image_pad|>` per merged patch +
`<|vision_end|>` before the request's ids, pixels from Qwen2VLImageProcessorPil.
LLaVA-1.5 / LLaVA-NeXT and InternVL2.5: the text `"<image>\\n"` (LLaVA) or
`"<IMG_CONTEXT>\\n"` (InternVL) per image + the request's text, expanded and
tokenized by transformers' LlavaProcessor / LlavaNextProcessor / InternVLProcessor
over the PIL image processor the checkpoint names (tokenized without special
tokens, as the server tokenizes). InternVL's processor is built without its video
processor (that one needs torchvision; images never use it).
Not for: the static batching and timing (baseline.py), parity checks (tests).
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from bench.backends import BenchRequest

QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
PROCESSOR_TYPES = ("llava", "llava_next", "internvl")
CLIP_CLASS_TOKENS = 1      # LLaVA's CLIP tower adds one class token to its patch rows (llava-hf's processor_config)


@dataclass(frozen=True, slots=True)
class VisionBatch:
    """A VL batch's pixel inputs (HF names) and, for models that take mm_token_type_ids (Qwen2-VL), the
    image placeholder id that marks image positions (None: the model takes no mm_token_type_ids)."""

    tensors: dict[str, torch.Tensor]
    image_token_id: int | None


class ImagePrompts(Protocol):
    def batch(self, requests: list[BenchRequest]) -> tuple[list[Sequence[int]], VisionBatch]: ...


class ImagePromptError(RuntimeError):
    """This checkpoint's images cannot be given to HF the way the server builds them; the message says why."""


def _open(data: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


class QwenImagePrompts:
    """Qwen2-VL prompts the way the server builds a text prompt with images: one vision block per image
    (start, one pad per merged patch, end) before the text; pixels from HF's own image processor."""

    def __init__(self, source: str, tokenizer: Any) -> None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.processor = Qwen2VLImageProcessorPil.from_pretrained(source)
        self.merge = int(self.processor.merge_size) ** 2
        ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
        self.start_id, self.pad_id, self.end_id = (int(i) for i in ids)

    def batch(self, requests: list[BenchRequest]) -> tuple[list[Sequence[int]], VisionBatch]:
        prompts: list[Sequence[int]] = []
        pixels, grids = [], []
        for request in requests:
            ids: list[int] = []
            for data in request.images:
                out = self.processor(images=[_open(data)], return_tensors="pt")
                pixels.append(out["pixel_values"])
                grids.append(out["image_grid_thw"])
                ids += [self.start_id] + [self.pad_id] * (int(out["image_grid_thw"].prod()) // self.merge) + \
                    [self.end_id]
            prompts.append(ids + list(request.token_ids))
        tensors = {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)}
        return prompts, VisionBatch(tensors, self.pad_id)


class ProcessorImagePrompts:
    """Any family whose HF processor expands one placeholder text per image (LLaVA, LLaVA-NeXT, InternVL).

    A request with images becomes `placeholder + "\\n"` per image + its text (unless its text already holds
    the placeholder, as the server leaves it then); one processor call over the batch's image requests gives
    their ids and the batch's pixels in request order. A request without images keeps its token ids (the
    server gets those ids, not text)."""

    def __init__(self, processor: Any, placeholder: str) -> None:
        self.processor = processor
        self.placeholder = placeholder

    def batch(self, requests: list[BenchRequest]) -> tuple[list[Sequence[int]], VisionBatch]:
        with_images = [r for r in requests if r.images]
        texts = [r.text if self.placeholder in r.text else (self.placeholder + "\n") * len(r.images) + r.text
                 for r in with_images]
        out = self.processor(text=texts, images=[_open(data) for r in with_images for data in r.images],
                             padding=True, return_tensors="pt", add_special_tokens=False)
        rows = iter([row[mask.bool()].tolist() for row, mask in zip(out["input_ids"], out["attention_mask"])])
        prompts: list[Sequence[int]] = [next(rows) if r.images else list(r.token_ids) for r in requests]
        tensors = {name: t for name, t in out.items() if name not in ("input_ids", "attention_mask")}
        return prompts, VisionBatch(tensors, None)


def _llava_processor(source: str, config: Any, tokenizer: Any) -> tuple[Any, str]:
    import transformers

    image_processor = transformers.AutoImageProcessor.from_pretrained(source, backend="pil")
    processor_class = (transformers.LlavaNextProcessor if config.model_type == "llava_next"
                       else transformers.LlavaProcessor)
    token = tokenizer.convert_ids_to_tokens(int(config.image_token_id))
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                patch_size=int(config.vision_config.patch_size),
                                vision_feature_select_strategy=config.vision_feature_select_strategy,
                                image_token=token, num_additional_image_tokens=CLIP_CLASS_TOKENS)
    return processor, token


def _internvl_processor(source: str, config: Any, tokenizer_dir: Path) -> tuple[Any, str]:
    """InternVLProcessor without its (torchvision) video processor: the tokenizer's image tokens come from the
    engine's vision/config.json ids, tokens per tile from the HF config as the processor's docstring says."""
    import transformers
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    vision_json = tokenizer_dir.parent / "vision" / "config.json"
    ids = json.loads(vision_json.read_text())
    plain = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    names = {"start_image_token": "image_start_token_id", "end_image_token": "image_end_token_id",
             "context_image_token": "image_token_id", "video_token": "video_token_id"}
    missing = [key for key in ("image_start_token_id", "image_end_token_id", "image_token_id") if key not in ids]
    if missing:
        raise ImagePromptError(f"{vision_json}: no {', '.join(missing)}; the InternVL baseline needs the image "
                               "tokens' ids")
    special = {name: plain.convert_ids_to_tokens(int(ids[key])) for name, key in names.items() if key in ids}
    special.setdefault("video_token", "<video>")      # the processor's pattern needs one; images never use it
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), extra_special_tokens=special)
    image_processor = transformers.AutoImageProcessor.from_pretrained(source, backend="pil")
    vision = config.vision_config
    side = int(vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size)
    patch = int(vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size)
    per_tile = round((side // patch) ** 2 * float(config.downsample_ratio) ** 2)
    processor = ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           video_processor=None, image_seq_length=per_tile)
    return processor, special["context_image_token"]


def image_prompts_for(source: str, config: Any, tokenizer: Any, tokenizer_dir: Path) -> ImagePrompts:
    """The image prompt builder for an HF VL config (`tokenizer` / `tokenizer_dir`: the engine's tokenizer)."""
    model_type = config.model_type
    if model_type in QWEN_TYPES:
        return QwenImagePrompts(source, tokenizer)
    if model_type in ("llava", "llava_next"):
        return ProcessorImagePrompts(*_llava_processor(source, config, tokenizer))
    if model_type == "internvl":
        return ProcessorImagePrompts(*_internvl_processor(source, config, tokenizer_dir))
    raise ImagePromptError(f"the HF baseline builds image prompts for model types {QWEN_TYPES + PROCESSOR_TYPES}, "
                           f"not {model_type!r} ({source})")
