"""Multimodal prompts: chat / text plus images and videos -> token ids with placeholder spans.

What it is for: `MultimodalProcessor` renders the chat template, tokenizes,
decodes (runtime/multimodal/image_io.py) and preprocesses every image / video
through the engine's family (runtime/families/), expands each placeholder token
into the family's tokens with one embedding row per LLM token of its visual,
and returns the `MultimodalInputs` the engine needs: the visuals, their spans
with content hashes (prefix-cache keys) and the family's positions (M-RoPE, or
none for a 1-D RoPE LLM). `check_multimodal` is the engine's admission check of
such inputs, whoever built them. Nothing here depends on the family.
Not for: running the vision tower (runtime/vision/encoder_cache.py drives it),
any family's placeholder rules, or network formats (grpc_service).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from runtime.errors import FieldError
from runtime.families import vision_family
from runtime.families.base import VisionFamily
from runtime.multimodal.image_io import ImageLimits, check_fps, check_image, check_num_images, decode_image, decode_video
from runtime.multimodal.image_processing import ProcessedVisual
from runtime.core.request import MultimodalSpan

if TYPE_CHECKING:
    from engine_format.engine_dir import LoadedEngine

Group = tuple[ProcessedVisual, ...]     # the visuals of one placeholder (one, or a video's frames)


@dataclass(frozen=True, slots=True)
class MultimodalInputs:
    visuals: tuple[ProcessedVisual, ...]
    spans: tuple[MultimodalSpan, ...]       # one per visual, in prompt order
    mrope_positions: np.ndarray | None      # [3, num_prompt_tokens] int64 (M-RoPE families); None: 1-D RoPE
    mrope_delta: int                        # decode token p has position p + mrope_delta on every axis


def family_of(engine: LoadedEngine) -> VisionFamily | None:
    """The vision-language family of an engine; None for a text-only engine."""
    return vision_family(engine.vision.config) if engine.vision is not None else None


class MultimodalProcessor:
    """Chat messages or text with images / videos -> (prompt token ids, MultimodalInputs)."""

    def __init__(self, engine: LoadedEngine, tokenizer: Any, limits: ImageLimits) -> None:
        family = family_of(engine)
        if family is None:
            raise FieldError("images", f"engine {engine.name!r} has no vision encoder; send text only")
        self.family = family
        self.prompt = family.prompt
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
        visuals: list[Group] = []
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
                elif kind == "image" and kind in self.prompt.kinds:
                    visuals.append(self._image(part.get("image"), f"{field}.image", len(visuals)))
                    parts.append({"type": "image"})
                elif kind == "video" and kind in self.prompt.kinds:
                    visuals.append(self._video(part.get("video"), part.get("fps"), f"{field}.video", len(visuals)))
                    parts.append({"type": "video"})
                else:
                    raise FieldError(f"{field}.type", f"must be {_either(('text', *self.prompt.kinds))}, "
                                                      f"got {kind!r}")
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
        if videos and "video" not in self.prompt.kinds:
            raise FieldError("videos", "this model takes no videos")
        image_visuals = [self._image(data, f"images[{i}]", i) for i, data in enumerate(images)]
        video_visuals = []
        for i, video in enumerate(videos):
            data, fps = video if isinstance(video, tuple) else (video, None)
            video_visuals.append(self._video(data, fps, f"videos[{i}]", len(images) + i))
        texts = self.prompt.placeholder_texts
        if not any(texts[kind] in text for kind in self.prompt.kinds):
            blocks = [self.prompt.default_blocks[g[0].kind] for g in image_visuals + video_visuals]
            text = "".join(blocks) + text
        # visuals in prompt order: image placeholders take images in order, video placeholders videos
        pending = {"image": iter(image_visuals), "video": iter(video_visuals)}
        ordered = []
        for kind in _placeholder_kinds(text, {kind: texts[kind] for kind in self.prompt.kinds}):
            group = next(pending[kind], None)
            if group is None:
                raise FieldError("text", f"has more {texts[kind]} placeholders than {kind}s "
                                         f"({len(image_visuals if kind == 'image' else video_visuals)})")
            ordered.append(group)
        if len(ordered) != len(image_visuals) + len(video_visuals):
            raise FieldError("text", f"holds {len(ordered)} vision placeholders for {len(image_visuals)} images "
                                     f"and {len(video_visuals)} videos")
        return self._expand(text, ordered, "text")

    # ------------------------------------------------------------------- helpers

    def _check_no_placeholders(self, text: str, field: str) -> None:
        for token in self.prompt.placeholder_texts.values():
            if token in text:
                raise FieldError(field, f"must not contain {token}; send the image as its own part")

    def _image(self, data: Any, field: str, index: int) -> Group:
        check_num_images(index + 1, field, self.limits)
        if isinstance(data, (bytes, bytearray, memoryview)):
            image = decode_image(bytes(data), field, self.limits)
        else:
            image = check_image(data, field, self.limits)
        return (self.family.preprocess_image(image, field),)

    def _video(self, data: Any, fps: Any, field: str, index: int) -> Group:
        """Frames shown at `fps` (default 2), or bytes: an encoded video sampled at `fps` frames per
        second of its own timeline (default 2, Qwen's rate)."""
        check_num_images(index + 1, field, self.limits)
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, (bytes, list, tuple)):
            raise FieldError(field, f"must be video bytes or a list of frames, got {type(data).__name__}")
        multiple = self.family.video_frame_multiple
        if isinstance(data, bytes) and fps is not None:
            check_fps(f"{field}.fps", fps)
            frames, frames_fps = decode_video(data, field, self.limits, target_fps=float(fps),
                                              temporal_patch_size=multiple)
        else:
            frames, frames_fps = decode_video(data, field, self.limits, fps=fps, temporal_patch_size=multiple)
        return self.family.preprocess_video(frames, frames_fps, field)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _expand(self, text: str, groups: list[Group], field: str) -> tuple[list[int], MultimodalInputs]:
        """Each placeholder token takes the next group; the family says what replaces it."""
        ids = self._tokenize(text)
        kind_of = {token: kind for kind, token in self.prompt.placeholder_ids.items() if kind in self.prompt.kinds}
        out: list[int] = []
        spans: list[MultimodalSpan] = []
        remaining = iter(groups)
        for token in ids:
            kind = kind_of.get(token)
            if kind is None:
                out.append(token)
                continue
            group = next(remaining, None)
            if group is None or group[0].kind != kind:
                raise FieldError(field, f"the {self.prompt.placeholder_texts[kind]} placeholders do not match "
                                        "the given visuals")
            expansion = self.family.expand(kind, group, self._tokenize)
            spans.extend(MultimodalSpan(len(out) + offset, length, visual.content_hash)
                         for visual, (offset, length) in zip(group, expansion.spans, strict=True))
            out.extend(expansion.token_ids)
        if next(remaining, None) is not None:
            raise FieldError(field, f"{len(groups)} visuals but only {len(spans)} placeholders after tokenizing")
        visuals = tuple(visual for group in groups for visual in group)
        return out, build_inputs(out, visuals, tuple(spans), self.family, field)


def build_inputs(token_ids: Sequence[int], visuals: tuple[ProcessedVisual, ...],
                 spans: tuple[MultimodalSpan, ...], family: VisionFamily, field: str = "prompt_token_ids"
                 ) -> MultimodalInputs:
    """MultimodalInputs with the family's positions; a FieldError when runs and visuals disagree."""
    try:
        positions, delta = family.positions(token_ids, visuals)
    except ValueError as exc:   # for example two placeholder runs with nothing between them
        raise FieldError(field, str(exc)) from None
    return MultimodalInputs(visuals, spans, positions, delta)


def check_multimodal(token_ids: Sequence[int], inputs: MultimodalInputs | None, family: VisionFamily | None) -> None:
    """Admission check: placeholders, spans, visuals and positions agree. Raises FieldError."""
    embed_ids = sorted(set(family.prompt.embed_ids.values())) if family is not None else []
    if inputs is None:
        if family is not None:
            pads = int(np.isin(np.asarray(token_ids, dtype=np.int64), embed_ids).sum())
            if pads:
                raise FieldError("prompt_token_ids", f"holds {pads} image / video placeholder tokens but the "
                                                     "request has no images or videos")
        return
    if family is None:
        raise FieldError("multimodal", "this engine has no vision encoder (a text-only model); "
                                       "send text only or serve a VL engine")
    if not inputs.visuals or len(inputs.visuals) != len(inputs.spans):
        raise FieldError("multimodal.spans", f"{len(inputs.spans)} spans for {len(inputs.visuals)} visuals "
                                             "(need one per visual, at least one)")
    embed_of = family.prompt.embed_ids
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
        if visual.kind not in embed_of or not np.all(ids[span.offset:span.offset + span.length] == embed_of[visual.kind]):
            raise FieldError(field, f"tokens are not all {visual.kind} placeholders")
        previous_end = span.offset + span.length
    num_pads = int(np.isin(ids, embed_ids).sum())
    if num_pads != sum(s.length for s in inputs.spans):
        raise FieldError("prompt_token_ids", f"holds {num_pads} placeholder tokens, the visuals cover "
                                             f"{sum(s.length for s in inputs.spans)}")
    expected = build_inputs(token_ids, inputs.visuals, inputs.spans, family)
    if not _same_positions(inputs, expected):
        raise FieldError("multimodal.mrope_positions", "do not match the prompt and its visuals")


def _same_positions(got: MultimodalInputs, expected: MultimodalInputs) -> bool:
    if got.mrope_delta != expected.mrope_delta:
        return False
    if got.mrope_positions is None or expected.mrope_positions is None:
        return got.mrope_positions is None and expected.mrope_positions is None
    return (got.mrope_positions.shape == expected.mrope_positions.shape
            and bool(np.array_equal(got.mrope_positions, expected.mrope_positions)))


def _placeholder_kinds(text: str, placeholders: dict[str, str]) -> list[str]:
    """The kind of each placeholder in text order."""
    found = []
    for kind, token in placeholders.items():
        start = text.find(token)
        while start != -1:
            found.append((start, kind))
            start = text.find(token, start + len(token))
    return [kind for _, kind in sorted(found)]


def _either(names: Sequence[str]) -> str:
    """'a', 'b' or 'c'."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
