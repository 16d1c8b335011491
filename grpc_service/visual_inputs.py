"""Images and videos of a request, from either API, through the runtime's `MultimodalProcessor`.

What it is for: the wire-neutral description of what a client sent
(`ImageSource`, `VideoSource`: encoded bytes, a URL, encoded frames, or raw
uint8 pixels as the Triton multimodal ensemble sends them) and
`VisualFrontend`, one per vision-language engine, which resolves URLs under
the server's `UrlPolicy`, hands everything to
`runtime.multimodal.processor.MultimodalProcessor` (decoding, limits, preprocessing,
placeholder expansion) on its own worker thread, off the event loop, and
returns `(prompt_token_ids, MultimodalInputs)`. At most `max_pending`
requests wait for that thread (beyond: `Overloaded`); counts and sizes the
client chose are checked before anything is read or decoded. Every refusal is
an `InvalidArgument` naming the field as the client sent it: the runtime's
field names (`messages[0].content[1].image`, `images[2]`, `text`) are
translated through the caller's `FieldNames`.
Not for: reading wire messages / tensors (native_service, triton_params) or
decoding itself (runtime.multimodal.image_io).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from grpc_service.errors import InvalidArgument, Overloaded
from grpc_service.image_urls import UrlPolicy, read_image_url
from engine_format.engine_dir import LoadedEngine
from runtime.errors import FieldError
from runtime.multimodal.image_io import ImageLimits, decode_image
from runtime.multimodal.processor import MultimodalInputs, MultimodalProcessor

T = TypeVar("T")
Prompt = tuple[list[int], MultimodalInputs]
# images / URLs a Triton request may list before the configured max_images_per_request is applied (they are
# decoded from the tensor first); no configuration needs more
MAX_VISUAL_SOURCES = 1024


@dataclass(frozen=True, slots=True)
class MediaPolicy:
    """What the server accepts: the runtime's image limits and where URLs may point."""

    limits: ImageLimits = field(default_factory=ImageLimits)
    urls: UrlPolicy = field(default_factory=UrlPolicy)


@dataclass(frozen=True, slots=True, eq=False)
class ImageSource:
    """One image as sent: exactly one of data / url / pixels."""

    field: str                            # how the client addressed it, e.g. images[1]
    data: bytes | None = None             # encoded (PNG, JPEG, ...)
    url: str | None = None
    pixels: np.ndarray | None = None      # uint8 [H, W, 3]


@dataclass(frozen=True, slots=True, eq=False)
class VideoSource:
    """One video as sent: exactly one of data / url / frames / pixels."""

    field: str
    data: bytes | None = None             # animated image or video file
    url: str | None = None
    frames: tuple[bytes, ...] = ()        # encoded frames
    pixels: np.ndarray | None = None      # uint8 [F, H, W, 3]
    fps: float | None = None


Visual = ImageSource | VideoSource
ChatContent = str | list[str | ImageSource | VideoSource]


@dataclass(frozen=True, slots=True)
class FieldNames:
    """Runtime field prefix -> the client's name for it (longest prefix wins)."""

    aliases: Mapping[str, str]

    def rename(self, runtime_field: str) -> str:
        for prefix in sorted(self.aliases, key=len, reverse=True):
            if runtime_field == prefix or runtime_field.startswith((prefix + ".", prefix + "[")):
                return self.aliases[prefix] + runtime_field[len(prefix):]
        return runtime_field

    def error(self, exc: FieldError) -> InvalidArgument:
        if isinstance(exc, InvalidArgument):       # the service's own: already in the client's names
            return exc
        message = str(exc).split(": ", 1)[-1]
        return InvalidArgument(self.rename(exc.field), message)


class VisualFrontend:
    """The multimodal path of one vision-language engine (one worker thread, its own tokenizer)."""

    def __init__(self, engine: LoadedEngine, policy: MediaPolicy, max_pending: int) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(engine.tokenizer_dir))   # used on the worker thread only
        self.processor = MultimodalProcessor(engine, tokenizer, policy.limits)
        self.policy = policy
        self.name = engine.name
        self.max_pending = max_pending
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"visual-{engine.name}")

    @property
    def limits(self) -> ImageLimits:
        return self.policy.limits

    async def chat(self, messages: Sequence[tuple[str, ChatContent]], add_generation_prompt: bool,
                   names: FieldNames) -> Prompt:
        """Chat turns whose content lists text, images and videos in order (runtime field names:
        messages[i].content[j])."""
        visuals = [part for _, content in messages if isinstance(content, list) for part in content
                   if not isinstance(part, str)]
        self.check_sources(visuals, names.rename("messages"))

        def run() -> Prompt:
            runtime_messages: list[dict[str, Any]] = []
            for role, content in messages:
                if isinstance(content, str):
                    runtime_messages.append({"role": role, "content": content})
                else:
                    runtime_messages.append({"role": role, "content": [self._part(p) for p in content]})
            return self.processor.process_chat(runtime_messages, add_generation_prompt)

        return await self._run(run, names)

    async def text(self, text: str, images: Sequence[ImageSource], videos: Sequence[VideoSource],
                   names: FieldNames) -> Prompt:
        """A raw prompt with images / videos (runtime field names: text, images[i], videos[i])."""
        self.check_sources([*images, *videos], names.rename("images"))

        def run() -> Prompt:
            image_inputs = [self._image(source) for source in images]
            video_inputs = [self._video(source) for source in videos]
            return self.processor.process_text(text, image_inputs, video_inputs)

        return await self._run(run, names)

    def check_sources(self, visuals: Sequence[Visual], field_name: str) -> None:
        """Counts and sizes the client chose, before anything is read or decoded."""
        limits = self.limits
        if len(visuals) > limits.max_images_per_request:
            raise InvalidArgument(field_name, f"{len(visuals)} images and videos exceed the limit of "
                                              f"{limits.max_images_per_request} per request")
        for source in visuals:
            max_bytes = limits.max_video_bytes if isinstance(source, VideoSource) else limits.max_image_bytes
            if source.data is not None and len(source.data) > max_bytes:
                raise InvalidArgument(source.field, f"{len(source.data)} bytes exceed the limit of {max_bytes}")
            if source.pixels is not None:
                height, width = source.pixels.shape[-3:-1]
                if height * width > limits.max_image_pixels:
                    raise InvalidArgument(source.field, f"{width}x{height} pixels exceed the limit of "
                                                        f"{limits.max_image_pixels} per image")
            if isinstance(source, VideoSource):
                num_frames = len(source.frames) if source.frames else (
                    source.pixels.shape[0] if source.pixels is not None else 0)
                if num_frames > limits.max_video_frames:
                    raise InvalidArgument(source.field, f"{num_frames} frames exceed the limit of "
                                                        f"{limits.max_video_frames}")
                for index, frame in enumerate(source.frames):
                    if len(frame) > limits.max_image_bytes:
                        raise InvalidArgument(f"{source.field}.frames[{index}]",
                                              f"{len(frame)} bytes exceed the limit of {limits.max_image_bytes}")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ worker thread

    async def _run(self, fn: Callable[[], T], names: FieldNames) -> T:
        if self._pending >= self.max_pending:
            raise Overloaded(self.name, self.max_pending)
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except FieldError as exc:
            raise names.error(exc) from None
        finally:
            self._pending -= 1

    def _part(self, part: str | ImageSource | VideoSource) -> dict[str, Any]:
        if isinstance(part, str):
            return {"type": "text", "text": part}
        if isinstance(part, ImageSource):
            return {"type": "image", "image": self._image(part)}
        frames, fps = self._video(part)
        return {"type": "video", "video": frames, "fps": fps}

    def _image(self, source: ImageSource) -> bytes | Image.Image:
        """Bytes or an unchecked PIL image: the processor decodes / checks it (once)."""
        if source.url is not None:
            return read_image_url(source.url, f"{source.field}.url", self.policy.urls)
        if source.pixels is not None:
            return Image.fromarray(np.ascontiguousarray(source.pixels))
        return source.data or b""

    def _video(self, source: VideoSource) -> tuple[bytes | list[Image.Image], float | None]:
        """Bytes or frames as PIL images, and the client's fps: the processor samples and checks them."""
        if source.url is not None:
            return read_image_url(source.url, f"{source.field}.url", self.policy.urls), source.fps
        if source.pixels is not None:
            return [Image.fromarray(np.ascontiguousarray(frame)) for frame in source.pixels], source.fps
        if source.frames:
            # a frame over the video frame limit is refused here, under the client's name for it
            limits = replace(self.limits, max_image_pixels=min(self.limits.max_image_pixels,
                                                               self.limits.max_video_frame_pixels))
            return [decode_image(data, f"{source.field}.frames[{i}]", limits)
                    for i, data in enumerate(source.frames)], source.fps
        return source.data or b"", source.fps


def pixel_images(array: np.ndarray, field_name: str) -> list[ImageSource]:
    """The multimodal ensemble's `image_bytes_input` after the batch dimension: [N, H, W, 3] or
    [N, 3, H, W] uint8 pixels (the backend's layout), or [N, 1, 1, L] encoded images, each row
    zero-padded to the longest (decoders stop at the image's end marker, so the padding is ignored)."""
    if array.ndim != 4 or array.shape[0] == 0:
        raise InvalidArgument(field_name, f"shape {list(array.shape)} must be [num_images, H, W, 3], "
                                          "[num_images, 3, H, W] or [num_images, 1, 1, num_bytes]")
    num, a, b, c = array.shape
    if num > MAX_VISUAL_SOURCES:
        raise InvalidArgument(field_name, f"{num} images exceed the limit of {MAX_VISUAL_SOURCES}")
    if a == 3 and c != 3:
        return [ImageSource(f"{field_name}[{i}]", pixels=array[i].transpose(1, 2, 0)) for i in range(num)]
    if c == 3:
        return [ImageSource(f"{field_name}[{i}]", pixels=array[i]) for i in range(num)]
    if a == 1 and b == 1:
        return [ImageSource(f"{field_name}[{i}]", data=array[i].tobytes()) for i in range(num)]
    raise InvalidArgument(field_name, f"image dims {[a, b, c]} are neither RGB pixels ([H, W, 3] / [3, H, W]) "
                                      "nor encoded bytes ([1, 1, num_bytes])")


def pixel_video(array: np.ndarray, field_name: str) -> VideoSource:
    """`video_bytes_input` after the batch dimension: [F, H, W, 3] or [F, 3, H, W] uint8 frames, or
    [1, 1, 1, L] one encoded video (animated image, mp4)."""
    if array.ndim != 4 or array.shape[0] == 0:
        raise InvalidArgument(field_name, f"shape {list(array.shape)} must be [num_frames, H, W, 3], "
                                          "[num_frames, 3, H, W] or [1, 1, 1, num_bytes]")
    num, a, b, c = array.shape
    if a == 3 and c != 3:
        return VideoSource(field_name, pixels=array.transpose(0, 2, 3, 1))
    if c == 3:
        return VideoSource(field_name, pixels=array)
    if num == 1 and a == 1 and b == 1:
        return VideoSource(field_name, data=array.tobytes())
    raise InvalidArgument(field_name, f"frame dims {[a, b, c]} are neither RGB pixels ([H, W, 3] / [3, H, W]) "
                                      "nor one encoded video ([1, 1, 1, num_bytes])")

