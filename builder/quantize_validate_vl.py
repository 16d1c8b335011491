"""Image prompts in the validation of a quantized vision-language engine.

What it is for: the image half of `validation.json` for a quantized VL build
(builder/quantize_validate.py adds these positions to its metrics). Each prompt is a
one-image chat message made by the runtime's processor from a held-out generated
image (builder/vision_quant.py `held_out_images`, never used for calibration). The
float model is fed the float vision tower's embeddings (`vision/encoder.onnx`); the
quantized engine the embeddings its server computes (`load_vision_encoder(engine,
"onnxruntime")`: `vision/encoder.int8.onnx` when the build wrote one), so the error
measured is the served one, end to end. The float model's greedy continuation is then
teacher-forced through both, one-token chunks at the processor's positions (M-RoPE
rows for the prompt, `p + delta` after it) with the embeddings at the placeholder rows.
`mm_greedy` is also the in-process quantized reference the tests compare serving with.
Not for: text prompts or the tolerance (builder/quantize_validate.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from builder.vision_quant import held_out_images
from engine_format.engine_dir import LoadedEngine
from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.executor.kv_storage import KVStorage
from runtime.executor.model import DecoderModel

QUESTIONS = ("Describe this image.", "What is the largest shape in the picture?", "Which colours do you see?")


@dataclass(frozen=True, slots=True)
class ImagePrompt:
    token_ids: list[int]
    positions: np.ndarray | None                  # [3, len(token_ids)] M-RoPE positions; None: 1-D
    delta: int                                    # decode position offset past the prompt
    spans: tuple[tuple[int, int], ...]            # (offset, length) of each image's placeholder rows


@dataclass(frozen=True, slots=True)
class ImageSet:
    prompts: tuple[ImagePrompt, ...]
    reference_rows: tuple[tuple[torch.Tensor, ...], ...]   # per prompt, per span: float tower rows
    served_rows: tuple[tuple[torch.Tensor, ...], ...]      # per prompt, per span: the server's tower rows
    served_graph: str


def make_prompt(processor: Any, image: Any, question: str) -> tuple[ImagePrompt, Any]:
    """(ImagePrompt, MultimodalInputs) of a one-image chat message."""
    ids, mm = processor.process_chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                                   {"type": "text", "text": question}]}])
    spans = tuple((s.offset, s.length) for s in mm.spans)
    return ImagePrompt(list(ids), mm.mrope_positions, int(mm.mrope_delta), spans), mm


def encode_rows(encoder: Any, mm: Any) -> tuple[torch.Tensor, ...]:
    pixels = torch.from_numpy(np.concatenate([v.pixel_values for v in mm.visuals], axis=0))
    return tuple(encoder.encode(pixels, [v.grid_thw for v in mm.visuals]).split([v.num_tokens for v in mm.visuals]))


def image_set(engine: LoadedEngine, count: int = len(QUESTIONS)) -> ImageSet:
    from transformers import AutoTokenizer

    from runtime.multimodal.image_io import ImageLimits
    from runtime.multimodal.processor import MultimodalProcessor
    from runtime.vision.vision_encoder import OnnxVisionEncoder, load_vision_encoder, onnx_graph_path

    assert engine.vision is not None
    processor = MultimodalProcessor(engine, AutoTokenizer.from_pretrained(str(engine.tokenizer_dir)), ImageLimits())
    float_encoder = OnnxVisionEncoder(str(engine.vision.onnx_path), engine.vision.config)
    served = load_vision_encoder(engine, "onnxruntime")
    prompts, ref_rows, served_rows = [], [], []
    for i, image in enumerate(held_out_images(count)):
        prompt, mm = make_prompt(processor, image, QUESTIONS[i % len(QUESTIONS)])
        prompts.append(prompt)
        ref_rows.append(encode_rows(float_encoder, mm))
        served_rows.append(encode_rows(served, mm))
    return ImageSet(tuple(prompts), tuple(ref_rows), tuple(served_rows), onnx_graph_path(engine).name)


def _chunk(prompt: ImagePrompt, rows: tuple[torch.Tensor, ...], j: int, token: int,
           block_ids: list[int]) -> SequenceChunk:
    """Token j alone: its position (prompt: M-RoPE row; after: p + delta) and its vision row, if any."""
    if j >= len(prompt.token_ids):
        return SequenceChunk([token], j, block_ids, position_delta=prompt.delta)
    embeds = tuple((0, r[j - off:j - off + 1]) for (off, n), r in zip(prompt.spans, rows) if off <= j < off + n)
    positions = None if prompt.positions is None else prompt.positions[:, j:j + 1]
    return SequenceChunk([token], j, block_ids, mrope_positions=positions, embeds=embeds)


def mm_greedy(model: DecoderModel, prompt: ImagePrompt, rows: tuple[torch.Tensor, ...], num_tokens: int,
              block: int) -> list[int]:
    """Greedy tokens of one image prompt alone: a prefill of the whole prompt, then one token per step."""
    n = len(prompt.token_ids)
    block_ids = list(range(-(-(n + num_tokens) // block)))
    kv = KVStorage(model.cfg, len(block_ids), block, model.dtype, model.device)
    prefill = SequenceChunk(prompt.token_ids, 0, block_ids, mrope_positions=prompt.positions,
                            embeds=tuple((off, r) for (off, _), r in zip(prompt.spans, rows)))
    logits = model.forward(ForwardBatch.build([prefill], block, model.device), kv)[-1]
    out: list[int] = []
    while len(out) < num_tokens:
        out.append(int(logits.argmax()))
        if len(out) == num_tokens:
            break
        step = SequenceChunk([out[-1]], n + len(out) - 1, block_ids, position_delta=prompt.delta)
        logits = model.forward(ForwardBatch.build([step], block, model.device), kv)[-1]
    return out


def mm_teacher_forced(model: DecoderModel, prompt: ImagePrompt, rows: tuple[torch.Tensor, ...],
                      continuation: list[int], block: int) -> torch.Tensor:
    """Logits [len(prompt) + len(continuation), V] predicting each next token, in one forward of one-token
    chunks over the same blocks (as builder/quantize_validate.py's text sequences)."""
    ids = prompt.token_ids + continuation
    block_ids = list(range(-(-len(ids) // block)))
    kv = KVStorage(model.cfg, len(block_ids), block, model.dtype, model.device)
    chunks = [_chunk(prompt, rows, j, t, block_ids) for j, t in enumerate(ids)]
    return model.forward(ForwardBatch.build(chunks, block, model.device), kv)


def image_logits(reference: DecoderModel, quantized: DecoderModel, images: ImageSet, num_new_tokens: int,
                 block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float logits, quantized logits) over every position of every image prompt and its continuation."""
    ref, quant = [], []
    for prompt, ref_rows, served_rows in zip(images.prompts, images.reference_rows, images.served_rows):
        continuation = mm_greedy(reference, prompt, ref_rows, num_new_tokens, block)
        ref.append(mm_teacher_forced(reference, prompt, ref_rows, continuation, block))
        quant.append(mm_teacher_forced(quantized, prompt, served_rows, continuation, block))
    return torch.cat(ref), torch.cat(quant)
