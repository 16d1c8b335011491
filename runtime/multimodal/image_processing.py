"""Visuals ready for a vision tower, whatever the family, and the steps every family shares.

What it is for: `ProcessedVisual` (one image, video or frame after a family's
preprocessing: pixel rows in the family's layout, its grid, the number of LLM
rows it becomes and a content hash for prefix caching), `content_hash` (the one
hashing rule), `to_rgb`, HF's `convert_to_rgb`: images with an alpha band or
a `transparency` key are composited onto white, everything else goes through
Pillow's `convert("RGB")`. One deliberate difference: 16-bit / 32-bit integer
greyscale (`I;16*`, `I`) is scaled from 0..65535 to 0..255 (HF clips, which
turns almost every real 16-bit image white). Also the steps around it that every
family takes the same way: `rgb_image` (to_rgb with a FieldError naming the
request field), `check_image_size` (both sides >= 1, aspect ratio within HF's
limit) and `normalise` (HF's rescale and normalisation, bit for bit; `normalise_table` and
`normalise_channels` give the same values for uint8 pixels by table lookup). Pillow and
numpy only; no torch.
Not for: a family's resize / tiling / patch order (runtime/families/<family>/),
decoding bytes or request limits (runtime/multimodal/image_io.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.errors import FieldError

MAX_ASPECT_RATIO = 200            # HF smart_resize refuses images longer than this to one side
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


@dataclass(frozen=True, slots=True)
class ProcessedVisual:
    """One image or video (or frame), ready for the vision encoder. Treat `pixel_values` as read-only."""

    kind: str                        # "image" | "video"
    pixel_values: np.ndarray         # float32, the family's layout; axis 0 concatenates across visuals
    grid_thw: tuple[int, ...]        # (t, h, w): t frames / tiles of h x w patches, then any integers the
                                     # family's encoder needs (its docstring says which)
    second_per_grid_t: float         # M-RoPE video time: temporal_patch_size / fps; 0.0 otherwise
    content_hash: str                # content_hash(kind, grid_thw, second_per_grid_t, the pixels)
    merge_size: int = 2              # patches per LLM row, per side (Qwen2-VL and 2.5-VL: 2)
    num_embeds: int | None = None    # LLM rows, where they are not num_patches / merge_size**2

    @property
    def num_patches(self) -> int:
        """Patches the tower sees (the unit of max_encoder_patches)."""
        t, h, w = self.grid_thw[:3]
        return t * h * w

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens this visual expands to (its embedding rows)."""
        if self.num_embeds is not None:
            return self.num_embeds
        return self.num_patches // self.merge_size**2


def to_rgb(image: Image.Image) -> Image.Image:
    """HF `convert_to_rgb`: alpha (a band or a `transparency` key) composited onto white.

    Integer greyscale deeper than 8 bits is scaled to 8 bits first (see the module
    docstring). Raises ValueError for modes Pillow cannot convert to RGB.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image, dtype=np.int64)
        scaled = np.clip((wide * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def rgb_image(image: Image.Image, field: str) -> Image.Image:
    """`to_rgb`; a FieldError naming `field` for a pixel mode Pillow cannot convert."""
    try:
        return to_rgb(image)
    except ValueError as exc:
        raise FieldError(field, f"pixel mode {image.mode!r} cannot be converted to RGB") from exc


def check_image_size(height: int, width: int, field: str) -> None:
    """Both sides >= 1 pixel and the aspect ratio within MAX_ASPECT_RATIO; a FieldError naming `field`."""
    if height < 1 or width < 1:
        raise FieldError(field, f"image is {width}x{height}; both sides must be >= 1 pixel")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise FieldError(field, f"image is {width}x{height}: aspect ratio {ratio:.1f} is above the limit of "
                                f"{MAX_ASPECT_RATIO}")


def normalise(pixels: np.ndarray, rescale_factor: float, image_mean: tuple[float, float, float],
              image_std: tuple[float, float, float]) -> np.ndarray:
    """uint8 pixels [..., C] -> float32 as HF computes them: rescale in float64, cast to float32, then
    (x - mean) / std in float32 (the order that makes the result bit-identical)."""
    scaled = (np.asarray(pixels, dtype=np.float64) * rescale_factor).astype(np.float32)
    return (scaled - np.asarray(image_mean, dtype=np.float32)) / np.asarray(image_std, dtype=np.float32)


def normalise_table(rescale_factor: float, image_mean: tuple[float, float, float],
                    image_std: tuple[float, float, float]) -> np.ndarray:
    """[C, 256] float32: `normalise` of every uint8 value, per channel. `normalise` works element by element,
    so looking a uint8 pixel up here gives exactly (bit for bit) what `normalise` computes for it."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], len(image_mean), axis=1)
    return np.ascontiguousarray(normalise(values, rescale_factor, image_mean, image_std).T)


def normalise_channels(pixels: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """out[:, c] = table[c][pixels[:, c]] for uint8 `pixels` [N, C, ...] (channel on axis 1): `normalise`
    as one table lookup per channel, written into `out` (float32, the shape of `pixels`)."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"normalise_channels takes uint8 pixels, got {pixels.dtype}")
    for channel in range(table.shape[0]):
        # uint8 indices are always inside the 256-row table; "clip" lets numpy write `out` without a buffer
        np.take(table[channel], pixels[:, channel], out=out[:, channel], mode="clip")


def content_hash(kind: str, grid_thw: tuple[int, ...], second_per_grid_t: float, pixels: np.ndarray) -> str:
    """The prefix cache's key for a visual's placeholder tokens, one rule for every family: it covers
    everything the embeddings and positions depend on (the fps is in it because Qwen2.5-VL's time
    positions, hence the K/V of a video and of every token after it, depend on it). `pixels`: the visual's
    pixel rows, or the uint8 pixels the engine's fixed preprocessing computes them from (fewer bytes to hash;
    the caches it keys belong to one engine). Its dtype and shape are hashed with its bytes."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256()      # SHA-NI on x86: about 2x blake2b's speed
    digest.update(kind.encode() + b"\0")
    digest.update(np.asarray(grid_thw, dtype="<i8").tobytes())
    digest.update(np.asarray([second_per_grid_t], dtype="<f8").tobytes())
    digest.update(f"{pixels.dtype.newbyteorder('<').str}{list(pixels.shape)}\0".encode())
    digest.update(pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).data)
    return digest.hexdigest()
