"""Decoding untrusted image and video bytes into RGB frames, within limits.

What it is for: the one gate between request bytes and pixels. Every size is
checked from the file header before any pixel is decoded (decompression bombs
are refused without allocating), every refusal is a FieldError naming the
request field and the limit, and decoder internals never reach the message.
Not for: resizing or normalising pixels (see `runtime/multimodal/image_processing.py`) or
counting images per prompt part (the multimodal processor calls
`check_num_images`).

Decisions, each matching HF where HF has an opinion:
* An animated image sent as an image is its first frame (HF's `load_image`,
  which opens with Pillow, does the same).
* EXIF orientation is applied (HF's `load_image` calls `exif_transpose`).
* Alpha (RGBA, LA, PA, palette or RGB/L with a `transparency` key) is
  composited onto white, as HF's `convert_to_rgb`; CMYK and the rest use
  Pillow's `convert("RGB")`; 16-bit greyscale is scaled to 8 bits (HF clips).
* Tiny images (down to 1x1) are accepted and resized up by the preprocessor, as
  HF does; images whose aspect ratio is above 200 are refused, as HF refuses them.
* Only PNG, JPEG (MPO included), GIF, WebP, BMP and TIFF are opened; other Pillow
  formats (EPS runs Ghostscript, JPEG 2000, ...) are refused.
* Videos: an animated GIF / WebP / APNG always; mp4, mov, webm, mkv, avi and
  ogg through PyAV when the `video` extra is installed. Frames are sampled as
  HF's Qwen2-VL video processor does (`fps` frames per second, at least 4,
  at most `max_video_frames`, a multiple of `temporal_patch_size`); uniform by
  index, so variable GIF frame delays are averaged.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from types import ModuleType

from PIL import Image, ImageOps

from runtime.errors import FieldError
from runtime.multimodal.image_processing import MAX_ASPECT_RATIO, to_rgb

IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
DEFAULT_VIDEO_FPS = 2.0           # Qwen2-VL's sampling rate
MIN_SAMPLED_FRAMES = 4            # HF Qwen2VLVideoProcessor.min_frames
DEFAULT_FRAME_MS = 100            # browsers show GIF frames with a delay <= 10 ms for 100 ms
_NOT_AN_IMAGE = ("not a decodable image (corrupt, truncated or unsupported format; "
                 "supported: PNG, JPEG, GIF, WebP, BMP, TIFF)")
_NOT_A_VIDEO = ("not a decodable video (corrupt, truncated or unsupported format; supported: "
                "animated GIF/WebP/PNG, and mp4/mov/webm/mkv/avi/ogg with the 'video' extra)")
_NO_PYAV = ("decoding mp4/mov/webm/mkv/avi/ogg video needs PyAV, which is not installed; "
            "install the 'video' extra (pip install 'trtserve[video]') or send decoded frames")


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What one request may ask us to decode. Every field is a positive integer."""

    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096         # width * height, checked from the header
    max_image_bytes: int = 20 * 2**20           # encoded size of one image
    max_video_bytes: int = 64 * 2**20           # encoded size of one video
    max_video_frames: int = 64                  # frames kept after sampling
    max_video_source_frames: int = 4096         # frames a video may hold
    max_video_frame_pixels: int = 2**21         # width * height of one video frame (1920x1080 fits)
    max_video_decoded_pixels: int = 2**31       # frames decoded * pixels per frame, per video
    min_image_side: int = 1                     # smaller images are refused; larger tiny ones are resized up

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FieldError(spec.name, f"must be an integer >= 1, got {value!r}")


def check_num_images(num_images: int, field: str, limits: ImageLimits) -> None:
    """Refuse a request carrying more images and videos than `max_images_per_request`."""
    if num_images > limits.max_images_per_request:
        raise FieldError(field, f"{num_images} images/videos given; the limit is "
                                f"{limits.max_images_per_request} per request")


def decode_image(data: bytes, field: str, limits: ImageLimits) -> Image.Image:
    """Encoded bytes -> an RGB image (first frame, EXIF orientation applied), or FieldError."""
    payload = _payload(data, field, limits.max_image_bytes, "image")
    opened = _open(payload, field, IMAGE_FORMATS, limits.max_image_pixels, limits, _NOT_AN_IMAGE)
    with opened:
        return _load_rgb(opened, field, limits.max_image_pixels, limits)


def check_image(image: Image.Image, field: str, limits: ImageLimits) -> Image.Image:
    """A caller's PIL image -> RGB under the same rules as `decode_image` (size checked first)."""
    if not isinstance(image, Image.Image):
        raise FieldError(field, f"expected image bytes or a PIL image, got {type(image).__name__}")
    _check_size(image.size, field, limits.max_image_pixels, limits)
    return _load_rgb(image, field, limits.max_image_pixels, limits)


def decode_video(data: bytes | Sequence[Image.Image], field: str, limits: ImageLimits, *,
                 fps: float | None = None, target_fps: float = DEFAULT_VIDEO_FPS,
                 temporal_patch_size: int = 2) -> tuple[list[Image.Image], float]:
    """Video bytes or decoded frames -> (sampled RGB frames, the fps those frames represent).

    `fps` is the rate of caller-given frames (default: `target_fps`, i.e. already
    sampled); encoded videos carry their own rate and are sampled to `target_fps`.
    """
    check_fps(f"{field}.fps", fps)
    check_fps("target_fps", target_fps)
    if not 1 <= temporal_patch_size <= limits.max_video_frames:
        raise ValueError(f"temporal_patch_size {temporal_patch_size} must lie in "
                         f"[1, max_video_frames={limits.max_video_frames}]")
    if isinstance(data, (list, tuple)):
        return _frames_from_list(data, field, limits, fps or target_fps, temporal_patch_size)
    payload = _payload(data, field, limits.max_video_bytes, "video")
    container_format = _container_format(payload)
    if container_format is not None:
        return _decode_with_pyav(payload, container_format, field, limits, target_fps,
                                 temporal_patch_size)
    return _decode_animation(payload, field, limits, target_fps, temporal_patch_size)


def sample_frame_indices(num_source_frames: int, source_fps: float, target_fps: float,
                         temporal_patch_size: int, max_frames: int) -> tuple[list[int], float]:
    """HF's fps sampling: which source frames to keep, and the fps the kept frames represent.

    Keeps `duration * target_fps` frames, at least MIN_SAMPLED_FRAMES, at most
    `max_frames` and the source count, floored to a multiple of
    `temporal_patch_size`. Sources shorter than `temporal_patch_size` are kept
    whole (the preprocessor pads them by repeating the last frame).
    """
    t = temporal_patch_size
    if num_source_frames < t:
        return list(range(num_source_frames)), source_fps
    upper = max(t, min(max_frames, num_source_frames) // t * t)
    wanted = num_source_frames / source_fps * target_fps
    num = min(max(wanted, MIN_SAMPLED_FRAMES), upper)
    num = max(t, math.floor(num / t) * t)
    indices = [i * num_source_frames // num for i in range(num)]
    return indices, num * source_fps / num_source_frames


def _payload(data: object, field: str, max_bytes: int, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FieldError(field, f"expected encoded {what} bytes, got {type(data).__name__}")
    payload = bytes(data)
    if not payload:
        raise FieldError(field, f"{what} is empty")
    if len(payload) > max_bytes:
        raise FieldError(field, f"{what} is {len(payload)} bytes; the limit is {max_bytes}")
    return payload


def _open(payload: bytes, field: str, formats: Sequence[str], max_pixels: int,
          limits: ImageLimits, bad_message: str) -> Image.Image:
    """Open lazily (header only) and check the declared size before any pixel is decoded."""
    webp_size = _webp_canvas_size(payload)
    if webp_size is not None:       # Pillow's WebP decoder allocates its canvas at open
        _check_size(webp_size, field, max_pixels, limits)
    try:
        image = Image.open(io.BytesIO(payload), formats=list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FieldError(field, f"image header declares too many pixels; the limit is "
                                f"{max_pixels}") from None
    except Exception:  # noqa: BLE001 - untrusted bytes: any decoder failure is one refusal
        raise FieldError(field, bad_message) from None
    try:
        _check_size(image.size, field, max_pixels, limits)
    except FieldError:
        image.close()
        raise
    return image


def _check_size(size: tuple[int, int], field: str, max_pixels: int, limits: ImageLimits) -> None:
    width, height = size
    if width < limits.min_image_side or height < limits.min_image_side:
        raise FieldError(field, f"image is {width}x{height}; each side must be at least "
                                f"{limits.min_image_side} pixel(s)")
    if width * height > max_pixels:
        raise FieldError(field, f"image is {width}x{height} = {width * height} pixels; "
                                f"the limit is {max_pixels}")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise FieldError(field, f"image is {width}x{height}: aspect ratio {ratio:.1f} is above "
                                f"the limit of {MAX_ASPECT_RATIO}")


def _load_rgb(image: Image.Image, field: str, max_pixels: int,
              limits: ImageLimits) -> Image.Image:
    """Decode frame 0, apply EXIF orientation, convert as HF's convert_to_rgb."""
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        upright = ImageOps.exif_transpose(image)   # always a new image, even without EXIF
        _check_size(upright.size, field, max_pixels, limits)
        return to_rgb(upright)
    except FieldError:
        raise
    except Exception:  # noqa: BLE001 - decoder failure, see _open
        raise FieldError(field, _NOT_AN_IMAGE) from None


def _rgb_copy(image: Image.Image) -> Image.Image:
    """An RGB image that no later seek on `image` can change."""
    rgb = to_rgb(image)
    return rgb.copy() if rgb is image else rgb


def _frames_from_list(frames: Sequence[object], field: str, limits: ImageLimits,
                      fps: float, temporal_patch_size: int) -> tuple[list[Image.Image], float]:
    if not frames:
        raise FieldError(field, "video has no frames")
    if len(frames) > limits.max_video_source_frames:
        raise FieldError(field, f"video has {len(frames)} frames; the limit is "
                                f"{limits.max_video_source_frames}")
    if len(frames) <= limits.max_video_frames:
        indices, kept_fps = list(range(len(frames))), fps
    else:
        indices, kept_fps = sample_frame_indices(len(frames), fps, fps, temporal_patch_size,
                                                 limits.max_video_frames)
    kept = []
    for index in indices:
        frame = frames[index]
        name = f"{field}[{index}]"
        if not isinstance(frame, Image.Image):
            raise FieldError(name, f"expected a PIL image, got {type(frame).__name__}")
        _check_size(frame.size, name, limits.max_video_frame_pixels, limits)
        kept.append(_load_rgb(frame, name, limits.max_video_frame_pixels, limits))
    return kept, kept_fps


def _decode_animation(payload: bytes, field: str, limits: ImageLimits, target_fps: float,
                      temporal_patch_size: int) -> tuple[list[Image.Image], float]:
    """Animated GIF / WebP / APNG (or a still image as one frame)."""
    opened = _open(payload, field, IMAGE_FORMATS, limits.max_video_frame_pixels, limits,
                   _NOT_A_VIDEO)
    with opened as image:
        try:
            num_frames = getattr(image, "n_frames", 1)
        except Exception:  # noqa: BLE001 - decoder failure, see _open
            raise FieldError(field, _NOT_A_VIDEO) from None
        width, height = image.size
        # Two passes (frame delays, then the sampled frames); each decodes up to every frame.
        _check_decode_budget(field, num_frames, 2 * width * height, limits)
        try:
            delays_ms = []
            for index in range(num_frames):
                image.seek(index)
                delay = image.info.get("duration") or 0
                delays_ms.append(delay if delay > 10 else DEFAULT_FRAME_MS)
            source_fps = num_frames * 1000.0 / sum(delays_ms)
            indices, fps = sample_frame_indices(num_frames, source_fps, target_fps,
                                                temporal_patch_size, limits.max_video_frames)
            frames = []
            for index in indices:
                image.seek(index)
                image.load()
                frames.append(_rgb_copy(image))
        except Exception:  # noqa: BLE001 - decoder failure, see _open
            raise FieldError(field, _NOT_A_VIDEO) from None
    return frames, fps


def _decode_with_pyav(payload: bytes, container_format: str, field: str, limits: ImageLimits,
                      target_fps: float, temporal_patch_size: int
                      ) -> tuple[list[Image.Image], float]:
    """Container video through PyAV: count packets, then decode keeping the sampled frames.

    The demuxer is fixed from the magic bytes, so FFmpeg never probes for formats
    that reference other files or URLs (HLS playlists, concat lists).
    """
    try:
        import av  # optional extra `video`
    except ImportError:
        raise FieldError(field, _NO_PYAV) from None
    try:
        with av.open(io.BytesIO(payload), mode="r", format=container_format) as container:
            stream = container.streams.video[0]
            size = (stream.codec_context.width, stream.codec_context.height)
            _check_size(size, field, limits.max_video_frame_pixels, limits)
            num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            _check_decode_budget(field, num_frames, size[0] * size[1], limits)
            rate = stream.average_rate or stream.guessed_rate
            if not rate or num_frames == 0:
                raise ValueError("no frame rate")
            indices, fps = sample_frame_indices(num_frames, float(rate), target_fps,
                                                temporal_patch_size, limits.max_video_frames)
        frames = _decode_selected(av, payload, container_format, field, indices, size, limits)
    except FieldError:
        raise
    except Exception:  # noqa: BLE001 - decoder failure, see _open
        raise FieldError(field, _NOT_A_VIDEO) from None
    if not frames:
        raise FieldError(field, _NOT_A_VIDEO)
    if len(frames) < len(indices) and len(frames) >= temporal_patch_size:
        kept = len(frames) // temporal_patch_size * temporal_patch_size
        fps *= kept / len(indices)
        frames = frames[:kept]
    return frames, fps


def _decode_selected(av: ModuleType, payload: bytes, container_format: str, field: str,
                     indices: list[int], size: tuple[int, int],
                     limits: ImageLimits) -> list[Image.Image]:
    wanted, last = set(indices), max(indices)
    frames = []
    with av.open(io.BytesIO(payload), mode="r", format=container_format) as container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            if index > last:
                break
            if index >= limits.max_video_source_frames:
                raise FieldError(field, f"video has more than {limits.max_video_source_frames} "
                                        f"frames, the limit")
            if (frame.width, frame.height) != size:
                raise FieldError(field, f"frame {index} is {frame.width}x{frame.height}, "
                                        f"the stream declares {size[0]}x{size[1]}")
            if index in wanted:
                frames.append(frame.to_image())
    return frames


def _check_decode_budget(field: str, num_frames: int, pixels_per_frame: int,
                         limits: ImageLimits) -> None:
    if num_frames > limits.max_video_source_frames:
        raise FieldError(field, f"video has {num_frames} frames; the limit is "
                                f"{limits.max_video_source_frames}")
    if num_frames * pixels_per_frame > limits.max_video_decoded_pixels:
        raise FieldError(field, f"decoding would touch {num_frames * pixels_per_frame} pixels "
                                f"({num_frames} frames); the limit is "
                                f"{limits.max_video_decoded_pixels}")


def check_fps(field: str, fps: float | None) -> None:
    if fps is None:
        return
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (
            math.isfinite(fps) and fps > 0):
        raise FieldError(field, f"must be a finite number > 0, got {fps!r}")


def _container_format(payload: bytes) -> str | None:
    """FFmpeg demuxer for ISO BMFF (mp4, mov), Matroska (webm, mkv), AVI or Ogg, by magic bytes."""
    head = payload[:12]
    if head[4:8] == b"ftyp":
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    if head.startswith(b"OggS"):
        return "ogg"
    return None


def _webp_canvas_size(payload: bytes) -> tuple[int, int] | None:
    """(width, height) from a WebP header (RIFF/WEBP + VP8X, VP8L or VP8 chunk), else None."""
    if len(payload) < 30 or payload[:4] != b"RIFF" or payload[8:12] != b"WEBP":
        return None
    chunk = payload[12:16]
    if chunk == b"VP8X":
        return (int.from_bytes(payload[24:27], "little") + 1,
                int.from_bytes(payload[27:30], "little") + 1)
    if chunk == b"VP8L" and payload[20] == 0x2F:
        bits = int.from_bytes(payload[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and payload[23:26] == b"\x9d\x01\x2a":
        return (int.from_bytes(payload[26:28], "little") & 0x3FFF,
                int.from_bytes(payload[28:30], "little") & 0x3FFF)
    return None
