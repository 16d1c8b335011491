"""Calibration batches of a vision-language engine: the LLM sees image embeddings at the placeholders.

What it is for: what builder/quantize.py runs through the HF language model when the
engine has a vision tower. A sample with images goes through the runtime's own
processor (runtime/multimodal/processor.py: chat template, preprocessing, placeholder
expansion, positions) and the runtime's own vision encoder on the engine being built
(`load_vision_encoder(engine, "onnxruntime")`: the int8 graph when `--vision-quant int8`
wrote one, else the float graph), so the calibration activations are the ones serving
produces. The HF language model (`model.model.language_model` of transformers'
image-text-to-text class) then takes `inputs_embeds` (token embeddings with the vision
rows put in at the spans) and, for M-RoPE families, the processor's [3, L] positions.
A sample without images is plain tokenized text, as for a text model.
Not for: the quantizers or the checkpoint (builder/quantize.py, builder/quantize_pack.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.calib_data import CalibSample, QuantizeError
from engine_format.engine_dir import LoadedEngine

MAX_TEXT_TOKENS = 256          # a text-only sample is cut here (image prompts are kept whole)


@dataclass(frozen=True, slots=True)
class CalibBatch:
    input_ids: torch.Tensor                          # [1, L]
    embeds: tuple[tuple[int, torch.Tensor], ...]     # (first row, [n, hidden] vision rows) per visual
    positions: torch.Tensor | None                   # [3, 1, L] M-RoPE positions; None: 1-D


@dataclass(frozen=True, slots=True)
class VLCalibData:
    batches: tuple[CalibBatch, ...]
    num_images: int
    vision_graph: str                                # which ONNX graph made the embeddings


def vl_calib_batches(engine: LoadedEngine, samples: list[CalibSample]) -> VLCalibData:
    from transformers import AutoTokenizer

    from runtime.multimodal.image_io import ImageLimits
    from runtime.multimodal.processor import MultimodalProcessor
    from runtime.vision.vision_encoder import load_vision_encoder, onnx_graph_path

    if engine.vision is None:
        raise ValueError("vl_calib_batches needs a vision-language engine")
    tokenizer = AutoTokenizer.from_pretrained(str(engine.tokenizer_dir))
    most = max([len(s.images) for s in samples] + [1])
    processor = MultimodalProcessor(engine, tokenizer, ImageLimits(max_images_per_request=most))
    encoder = load_vision_encoder(engine, "onnxruntime")
    batches: list[CalibBatch] = []
    num_images = 0
    for i, sample in enumerate(samples):
        if not sample.images:
            ids = tokenizer(sample.text, add_special_tokens=False)["input_ids"][:MAX_TEXT_TOKENS]
            if ids:
                batches.append(CalibBatch(torch.tensor([ids]), (), None))
            continue
        content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in sample.images]
        try:
            ids, mm = processor.process_chat([{"role": "user", "content": content + [{"type": "text",
                                                                                      "text": sample.text}]}])
        except ValueError as exc:      # FieldError: an image the processor refuses
            raise QuantizeError(f"--calib-data: calibration sample {i + 1}: {exc}") from None
        pixels = torch.from_numpy(np.concatenate([v.pixel_values for v in mm.visuals], axis=0))
        rows = encoder.encode(pixels, [v.grid_thw for v in mm.visuals])
        pieces = rows.split([v.num_tokens for v in mm.visuals])
        embeds = tuple((span.offset, piece) for span, piece in zip(mm.spans, pieces))
        positions = None if mm.mrope_positions is None else torch.from_numpy(mm.mrope_positions)[:, None, :]
        batches.append(CalibBatch(torch.tensor([ids]), embeds, positions))
        num_images += len(mm.visuals)
    return VLCalibData(tuple(batches), num_images, onnx_graph_path(engine).name)


def load_language_model(hf_dir: Path) -> Any:
    """transformers' VL model (float32) and its language model: the module that is calibrated."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None or not hasattr(language_model, "layers"):
        raise QuantizeError(f"--quant: {type(model).__name__} has no model.language_model with decoder layers; "
                            "this VL model cannot be calibrated by this version")
    return language_model


def run_vl_batch(language_model: Any, batch: CalibBatch) -> None:
    """One calibration forward of the language model with the vision rows in place."""
    embeds = language_model.embed_tokens(batch.input_ids)
    for row, rows in batch.embeds:
        embeds[0, row:row + rows.shape[0]] = rows.to(embeds.dtype)
    language_model(inputs_embeds=embeds, position_ids=batch.positions, use_cache=False)
