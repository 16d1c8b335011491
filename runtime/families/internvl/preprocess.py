"""InternVL2.5 pixel preprocessing: dynamic high-resolution tiling, equal to Hugging Face's processor.

What it is for: turning one decoded RGB image into the 448x448 tiles InternVL's
vision tower takes (1..max_tiles tiles on the grid whose aspect ratio is closest
to the image's, plus a thumbnail of the whole image when there is more than one
tile), and each video frame into one tile (one visual per frame): `pixel_values [num_tiles, 3, tile, tile]`
float32 (HF's layout), `grid_thw` (num_tiles, tile / patch, tile / patch); the tower's 0.5
pixel-shuffle is a 2x2 merge, so each tile gives (tile / patch / 2)^2 LLM tokens
(256 at 448 px with 14 px patches).
Not for: decoding bytes or request limits (runtime/multimodal/image_io.py), the
placeholder text (`<img>`, `<IMG_CONTEXT>`, `</img>`) or the tower itself.

Equality with HF (`GotOcr2ImageProcessorPil` with `crop_to_patches=True`, the image
processor of transformers' `InternVLProcessor`) is exact, bit for bit: the same grid
choice (`get_optimal_tiled_canvas`: closest aspect ratio, ties go to the larger grid
while the image covers more than half of it), one Pillow bicubic resize of the uint8
image to the whole canvas then crops, a separate bicubic resize to one tile for the
thumbnail, rescale in float64 then float32, normalise in float32. Video frames:
HF's InternVL video processor resizes with torchvision (not installable here); our
frames take the image processor's single-tile path (`crop_to_patches=False`), bit
for bit, which is the documented reference for video (OpenGVLab's own video code
also resizes each frame to one tile with PIL bicubic).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.errors import FieldError
from runtime.families.preprocess_checks import FIELD, check_keys, float_triple, positive_float, positive_int
from runtime.multimodal.image_processing import ProcessedVisual, content_hash, normalise, rgb_image

_INT_KEYS = ("tile_size", "patch_size", "min_tiles", "max_tiles")
_ALL_KEYS = frozenset(_INT_KEYS + ("use_thumbnail", "image_mean", "image_std", "rescale_factor"))
MERGE_SIZE = 2          # pixel-shuffle 0.5 = a 2x2 merge of patch features
MAX_TILES_LIMIT = 40    # OpenGVLab trains with at most 12 (40 for InternVL3 at test time); refuse absurd configs


@dataclass(frozen=True, slots=True)
class TilingConfig:
    """The `preprocessing` block of an InternVL `vision/config.json` (HF GotOcr2 processor values)."""

    tile_size: int                  # side of a tile in pixels (HF `size.height`, OpenGVLab `force_image_size`)
    patch_size: int
    min_tiles: int                  # HF `min_patches`
    max_tiles: int                  # HF `max_patches`
    use_thumbnail: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float

    @property
    def patches_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return (self.patches_per_side // MERGE_SIZE) ** 2

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> TilingConfig:
        """Validate and build; a FieldError names `preprocessing.<key>` and the rule."""
        d = check_keys(d, _ALL_KEYS, _ALL_KEYS)
        ints = {key: positive_int(key, d[key]) for key in _INT_KEYS}
        if ints["tile_size"] % (ints["patch_size"] * MERGE_SIZE):
            raise FieldError(f"{FIELD}.tile_size", f"must be a multiple of 2 * patch_size "
                                                   f"({2 * ints['patch_size']}), got {ints['tile_size']}")
        if not ints["min_tiles"] <= ints["max_tiles"] <= MAX_TILES_LIMIT:
            raise FieldError(f"{FIELD}.max_tiles", f"must lie in [min_tiles ({ints['min_tiles']}), "
                                                   f"{MAX_TILES_LIMIT}], got {ints['max_tiles']}")
        if not isinstance(d["use_thumbnail"], bool):
            raise FieldError(f"{FIELD}.use_thumbnail", f"must be true or false, got {d['use_thumbnail']!r}")
        mean = float_triple("image_mean", d["image_mean"], positive=False)
        std = float_triple("image_std", d["image_std"], positive=True)
        rescale = positive_float("rescale_factor", d["rescale_factor"])
        return cls(use_thumbnail=d["use_thumbnail"], rescale_factor=rescale, image_mean=mean, image_std=std, **ints)


def tile_grid(height: int, width: int, cfg: TilingConfig) -> tuple[int, int]:
    """(columns, rows) of the tile grid for an image of this size (HF `get_optimal_tiled_canvas`)."""
    grids = sorted(((c, r) for c in range(1, cfg.max_tiles + 1) for r in range(1, cfg.max_tiles + 1)
                    if cfg.min_tiles <= c * r <= cfg.max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in grids:
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and area > 0.5 * cfg.tile_size * cfg.tile_size * columns * rows:
            best = (columns, rows)
    return best


def num_tiles(height: int, width: int, cfg: TilingConfig) -> int:
    """Tiles an image of this size becomes (the grid, plus the thumbnail when the grid has several)."""
    columns, rows = tile_grid(height, width, cfg)
    grid = columns * rows
    return grid + 1 if cfg.use_thumbnail and grid > 1 else grid


def preprocess_tiled_image(image: Image.Image, cfg: TilingConfig, *, field: str = "image") -> ProcessedVisual:
    """One image -> its tiles' patch rows, grid (num_tiles, tile / patch, tile / patch)."""
    rgb = rgb_image(image, field)
    width, height = rgb.size
    if width < 1 or height < 1:
        raise FieldError(field, f"image is {width}x{height}; both sides must be >= 1 pixel")
    columns, rows = tile_grid(height, width, cfg)
    side = cfg.tile_size
    canvas = np.asarray(rgb.resize((side * columns, side * rows), Image.Resampling.BICUBIC))
    tiles = [canvas[r * side:(r + 1) * side, c * side:(c + 1) * side]
             for r in range(rows) for c in range(columns)]
    if cfg.use_thumbnail and len(tiles) > 1:
        tiles.append(np.asarray(rgb.resize((side, side), Image.Resampling.BICUBIC)))
    return _make_visual("image", tiles, cfg)


def preprocess_frames(frames: Sequence[Image.Image], cfg: TilingConfig, *,
                      field: str = "video") -> tuple[ProcessedVisual, ...]:
    """Video frames -> one visual per frame (the frame resized to one tile), grid (1, ...) each."""
    if len(frames) == 0:
        raise FieldError(field, "video has no frames")
    side = cfg.tile_size
    return tuple(_make_visual("video", [np.asarray(rgb_image(frame, f"{field}[{i}]").resize(
        (side, side), Image.Resampling.BICUBIC))], cfg) for i, frame in enumerate(frames))


def _make_visual(kind: str, tiles: list[np.ndarray], cfg: TilingConfig) -> ProcessedVisual:
    """uint8 tiles [side, side, 3] -> normalised float32 [T, 3, side, side]."""
    pixels = normalise(np.stack(tiles), cfg.rescale_factor, cfg.image_mean, cfg.image_std)   # [T, S, S, C]
    pixel_values = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
    grid = (len(tiles), cfg.patches_per_side, cfg.patches_per_side)
    return ProcessedVisual(kind=kind, pixel_values=pixel_values, grid_thw=grid, second_per_grid_t=0.0,
                           content_hash=content_hash(kind, grid, 0.0, pixel_values), merge_size=MERGE_SIZE)
