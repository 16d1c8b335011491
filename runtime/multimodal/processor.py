"""Multimodal prompts: chat / text plus images and videos -> token ids with placeholder spans.

What it is for: `MultimodalProcessor` renders the chat template, tokenizes,
decodes and preprocesses every image / video (runtime/multimodal/image_io.py,
runtime/multimodal/image_processing.py), expands each `<|image_pad|>` / `<|video_pad|>`
into one placeholder per LLM token of its visual, and returns the
`MultimodalInputs` the engine needs: the visuals, their spans with content
hashes (prefix-cache keys) and the M-RoPE positions. `check_multimodal` is the
engine's admission check of such inputs, whoever built them.
Not for: running the vision tower (runtime/vision/encoder_cache.py drives it) or
network formats (grpc_service).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from runtime.errors import FieldError
from runtime.multimodal.image_io import ImageLimits, check_fps, check_image, check_num_images, decode_image, decode_video
from runtime.multimodal.image_processing import PreprocessConfig, ProcessedVisual, preprocess_image, preprocess_video
from runtime.multimodal.mrope import MRopeSpec, mrope_positions
from runtime.core.request import MultimodalSpan

if TYPE_CHECKING:
    from engine_format.engine_dir import LoadedEngine

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
PLACEHOLDERS = {"image": IMAGE_PAD, "video": VIDEO_PAD}


@dataclass(frozen=True, slots=True)
class MultimodalInputs:
    visuals: tuple[ProcessedVisual, ...]
    spans: tuple[MultimodalSpan, ...]       # one per visual, in prompt order
    mrope_positions: np.ndarray             # [3, num_prompt_tokens] int64
    mrope_delta: int                        # decode token p has position p + mrope_delta on every axis


def mrope_spec_of(engine: LoadedEngine) -> MRopeSpec | None:
    """The M-RoPE token ids and merge size of a VL engine; None for a text-only engine."""
    if engine.vision is None:
        return None
    cfg = engine.vision.config
    return MRopeSpec(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.spatial_merge_size,
                     float(cfg.tokens_per_second or 0), cfg.model_type)


class MultimodalProcessor:
    """Chat messages or text with images / videos -> (prompt token ids, MultimodalInputs)."""

    def __init__(self, engine: LoadedEngine, tokenizer: Any, limits: ImageLimits) -> None:
        spec = mrope_spec_of(engine)
        if spec is None or engine.vision is None:
            raise FieldError("images", f"engine {engine.name!r} has no vision encoder; send text only")
        self.spec = spec
        self.preprocess = PreprocessConfig.from_dict(engine.vision.config.preprocessing)
        self.tokenizer = tokenizer
        self.limits = limits

    # ---------------------------------------------------------------- entry points

    def process_chat(self, messages: list[dict], add_generation_prompt: bool = True
                     ) -> tuple[list[int], MultimodalInputs]:
        """messages: {"role", "content": str | [{"type": "text", "text"}, {"type": "image", "image"},
        {"type": "video", "video": bytes | list[PIL.Image], "fps"}]}; visuals in message order."""
        if not isinstance(messages, list) or not messages:
            raise FieldError("messages", "must be a non-empty list")
        template_messages: list[dict] = []
        visuals: list[ProcessedVisual] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise FieldError(f"messages[{i}]", "must be an object with a string 'role'")
            content = message.get("content")
            if isinstance(content, str):
                self._check_no_placeholders(content, f"messages[{i}].content")
                template_messages.append({"role": message["role"], "content": content})
                continue
            if not isinstance(content, list):
                raise FieldError(f"messages[{i}].content", "must be a string or a list of parts")
            parts = []
            for j, part in enumerate(content):
                field = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise FieldError(f"{field}.text", "must be a string")
                    self._check_no_placeholders(text, f"{field}.text")
                    parts.append({"type": "text", "text": text})
                elif kind == "image":
                    visuals.append(self._image(part.get("image"), f"{field}.image", len(visuals)))
                    parts.append({"type": "image"})
                elif kind == "video":
                    visuals.append(self._video(part.get("video"), part.get("fps"), f"{field}.video", len(visuals)))
                    parts.append({"type": "video"})
                else:
                    raise FieldError(f"{field}.type", f"must be 'text', 'image' or 'video', got {kind!r}")
            template_messages.append({"role": message["role"], "content": parts})
        text = self.tokenizer.apply_chat_template(template_messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self._expand(text, visuals, "messages")

    def process_text(self, text: str, images: Sequence[bytes | Image.Image],
                     videos: Sequence[bytes | tuple[Sequence[Image.Image], float]] = ()
                     ) -> tuple[list[int], MultimodalInputs]:
        """`text` may hold one vision block per image / video; with none, one block each is put first."""
        if not isinstance(text, str):
            raise FieldError("text", "must be a string")
        if not images and not videos:
            raise FieldError("images", "no images or videos given; send a text request instead")
        check_num_images(len(images) + len(videos), "images", self.limits)
        image_visuals = [self._image(data, f"images[{i}]", i) for i, data in enumerate(images)]
        video_visuals = []
        for i, video in enumerate(videos):
            data, fps = video if isinstance(video, tuple) else (video, None)
            video_visuals.append(self._video(data, fps, f"videos[{i}]", len(images) + i))
        if IMAGE_PAD not in text and VIDEO_PAD not in text:
            blocks = [VISION_START + PLACEHOLDERS[v.kind] + VISION_END for v in image_visuals + video_visuals]
            text = "".join(blocks) + text
        # visuals in prompt order: image pads take images in order, video pads videos
        pending = {"image": iter(image_visuals), "video": iter(video_visuals)}
        ordered = []
        for kind in _placeholder_kinds(text):
            visual = next(pending[kind], None)
            if visual is None:
                raise FieldError("text", f"has more {PLACEHOLDERS[kind]} placeholders than {kind}s "
                                         f"({len(image_visuals if kind == 'image' else video_visuals)})")
            ordered.append(visual)
        if len(ordered) != len(image_visuals) + len(video_visuals):
            raise FieldError("text", f"holds {len(ordered)} vision placeholders for {len(image_visuals)} images "
                                     f"and {len(video_visuals)} videos")
        return self._expand(text, ordered, "text")

    # ------------------------------------------------------------------- helpers

    def _check_no_placeholders(self, text: str, field: str) -> None:
        for token in (IMAGE_PAD, VIDEO_PAD):
            if token in text:
                raise FieldError(field, f"must not contain {token}; send the image as its own part")

    def _image(self, data: Any, field: str, index: int) -> ProcessedVisual:
        check_num_images(index + 1, field, self.limits)
        if isinstance(data, (bytes, bytearray, memoryview)):
            image = decode_image(bytes(data), field, self.limits)
        else:
            image = check_image(data, field, self.limits)
        return preprocess_image(image, self.preprocess, field=field)

    def _video(self, data: Any, fps: Any, field: str, index: int) -> ProcessedVisual:
        """Frames shown at `fps` (default 2), or bytes: an encoded video sampled at `fps` frames per
        second of its own timeline (default 2, Qwen's rate)."""
        check_num_images(index + 1, field, self.limits)
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, (bytes, list, tuple)):
            raise FieldError(field, f"must be video bytes or a list of frames, got {type(data).__name__}")
        if isinstance(data, bytes) and fps is not None:
            check_fps(f"{field}.fps", fps)
            frames, frames_fps = decode_video(data, field, self.limits, target_fps=float(fps),
                                              temporal_patch_size=self.preprocess.temporal_patch_size)
        else:
            frames, frames_fps = decode_video(data, field, self.limits, fps=fps,
                                              temporal_patch_size=self.preprocess.temporal_patch_size)
        return preprocess_video(frames, self.preprocess, frames_fps, field=field)

    def _expand(self, text: str, visuals: list[ProcessedVisual], field: str
                ) -> tuple[list[int], MultimodalInputs]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        pad_ids = {self.spec.image_token_id: "image", self.spec.video_token_id: "video"}
        out: list[int] = []
        spans: list[MultimodalSpan] = []
        remaining = iter(visuals)
        for token in ids:
            kind = pad_ids.get(token)
            if kind is None:
                out.append(token)
                continue
            visual = next(remaining, None)
            if visual is None or visual.kind != kind:
                raise FieldError(field, f"the {PLACEHOLDERS[kind]} placeholders do not match the given visuals")
            spans.append(MultimodalSpan(len(out), visual.num_tokens, visual.content_hash))
            out.extend([token] * visual.num_tokens)
        if next(remaining, None) is not None:
            raise FieldError(field, f"{len(visuals)} visuals but only {len(spans)} placeholders after tokenizing")
        inputs = build_inputs(out, tuple(visuals), tuple(spans), self.spec, field)
        return out, inputs


def build_inputs(token_ids: Sequence[int], visuals: tuple[ProcessedVisual, ...],
                 spans: tuple[MultimodalSpan, ...], spec: MRopeSpec, field: str = "prompt_token_ids"
                 ) -> MultimodalInputs:
    """MultimodalInputs with M-RoPE positions; a FieldError when runs and visuals disagree."""
    try:
        positions, delta = mrope_positions(token_ids, visuals, spec)
    except ValueError as exc:   # for example two placeholder runs with nothing between them
        raise FieldError(field, str(exc)) from None
    return MultimodalInputs(visuals, spans, positions, delta)


def check_multimodal(token_ids: Sequence[int], inputs: MultimodalInputs | None, spec: MRopeSpec | None) -> None:
    """Admission check: placeholders, spans, visuals and positions agree. Raises FieldError."""
    if inputs is None:
        if spec is not None:
            pads = sum(1 for t in token_ids if t in (spec.image_token_id, spec.video_token_id))
            if pads:
                raise FieldError("prompt_token_ids", f"holds {pads} image / video placeholder tokens but the "
                                                     "request has no images or videos")
        return
    if spec is None:
        raise FieldError("multimodal", "this engine has no vision encoder (a text-only model); "
                                       "send text only or serve a VL engine")
    if not inputs.visuals or len(inputs.visuals) != len(inputs.spans):
        raise FieldError("multimodal.spans", f"{len(inputs.spans)} spans for {len(inputs.visuals)} visuals "
                                             "(need one per visual, at least one)")
    pad_of = {"image": spec.image_token_id, "video": spec.video_token_id}
    ids = np.asarray(token_ids, dtype=np.int64)
    previous_end = 0
    for i, (visual, span) in enumerate(zip(inputs.visuals, inputs.spans)):
        field = f"multimodal.spans[{i}]"
        if span.offset < previous_end or span.offset + span.length > len(ids):
            raise FieldError(field, f"[{span.offset}, {span.offset + span.length}) is outside the prompt "
                                    f"({len(ids)} tokens) or overlaps the previous span")
        if span.length != visual.num_tokens or span.content_hash != visual.content_hash:
            raise FieldError(field, f"length {span.length} / hash do not match its {visual.kind} "
                                    f"({visual.num_tokens} tokens)")
        if visual.kind not in pad_of or not np.all(ids[span.offset:span.offset + span.length] == pad_of[visual.kind]):
            raise FieldError(field, f"tokens are not all {visual.kind} placeholders")
        previous_end = span.offset + span.length
    num_pads = int(np.isin(ids, list(pad_of.values())).sum())
    if num_pads != sum(s.length for s in inputs.spans):
        raise FieldError("prompt_token_ids", f"holds {num_pads} placeholder tokens, the visuals cover "
                                             f"{sum(s.length for s in inputs.spans)}")
    expected = build_inputs(token_ids, inputs.visuals, inputs.spans, spec)
    if (inputs.mrope_positions.shape != expected.mrope_positions.shape
            or not np.array_equal(inputs.mrope_positions, expected.mrope_positions)
            or inputs.mrope_delta != expected.mrope_delta):
        raise FieldError("multimodal.mrope_positions", "do not match the prompt and its visuals")


def _placeholder_kinds(text: str) -> list[str]:
    """'image' / 'video' for each placeholder in text order."""
    found = []
    for kind, token in PLACEHOLDERS.items():
        start = text.find(token)
        while start != -1:
            found.append((start, kind))
            start = text.find(token, start + len(token))
    return [kind for _, kind in sorted(found)]
