"""LLaVA-1.5 / LLaVA-NeXT pixel preprocessing, equal to Hugging Face's PIL image processors.

What it is for: turning one decoded image into the crops the CLIP tower takes
(`pixel_values [num_crops, C, S, S]` float32). LLaVA-1.5 (HF `CLIPImageProcessorPil` /
`LlavaImageProcessorPil`): optional pad to square with the mean colour, bicubic
resize of the shortest edge to S, centre crop S x S. LLaVA-NeXT (HF
`LlavaNextImageProcessorPil`): the anyres pinpoint that keeps the most
resolution, an aspect-preserving bicubic resize into it, zero padding centred,
S x S crops row by row, and first of all the whole image squashed to S x S.
Rescale in float64 then cast to float32, normalise in float32, as HF does, so
the result is bit-identical (tests/runtime/families/test_llava_preprocess.py).
One deliberate difference: images longer than MAX_ASPECT_RATIO (200) to one side
are refused, naming the field (HF would resize a 100000x1 image's short side to
S, a 33.6-megapixel intermediate at S = 336). Pillow and numpy only.
Not for: decoding bytes or request limits (runtime/multimodal/image_io.py), the
anyres geometry (runtime/families/llava/geometry.py owns it; this module only
applies it), tokenisation.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.errors import FieldError
from runtime.families.llava.geometry import select_best_resolution
from runtime.families.preprocess_checks import FIELD, check_keys, float_triple, positive_float, positive_int
from runtime.multimodal.image_processing import check_image_size, normalise, rgb_image

_REQUIRED_KEYS = frozenset(("image_size", "image_mean", "image_std", "rescale_factor"))
_KEYS = _REQUIRED_KEYS | {"do_pad", "image_grid_pinpoints"}


@dataclass(frozen=True, slots=True)
class LlavaPreprocessConfig:
    """The `preprocessing` block of a LLaVA engine's vision/config.json.

    `image_size` is HF's size.shortest_edge and crop_size (the tower's input side);
    real checkpoints set both to the tower's image_size, and so must ours."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    do_pad: bool = False                                   # LLaVA-1.5 pad-to-square (LlavaImageProcessor)
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT anyres (h, w); () for 1.5

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> LlavaPreprocessConfig:
        d = check_keys(d, _KEYS, _REQUIRED_KEYS)
        size = positive_int("image_size", d["image_size"])
        mean = float_triple("image_mean", d["image_mean"], positive=False)
        std = float_triple("image_std", d["image_std"], positive=True)
        rescale = positive_float("rescale_factor", d["rescale_factor"])
        pinpoints = _pinpoints(d.get("image_grid_pinpoints") or (), size)
        return cls(size, mean, std, rescale, bool(d.get("do_pad", False)), pinpoints)

    def to_dict(self) -> dict[str, object]:
        return {"image_size": self.image_size, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "rescale_factor": self.rescale_factor, "do_pad": self.do_pad,
                "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints]}


def preprocess_llava(image: Image.Image, cfg: LlavaPreprocessConfig, field: str = "image") -> np.ndarray:
    """One image -> float32 crops [num_crops, 3, S, S], equal to HF's processor of the family."""
    rgb = rgb_image(image, field)
    width, height = rgb.size
    check_image_size(height, width, field)
    if cfg.image_grid_pinpoints:
        crops = _anyres_crops(rgb, cfg)
    else:
        crops = [_clip_crop(rgb, cfg)]
    return np.stack([normalise(c, cfg.rescale_factor, cfg.image_mean, cfg.image_std)
                     for c in crops]).transpose(0, 3, 1, 2).copy()


def _clip_crop(rgb: Image.Image, cfg: LlavaPreprocessConfig) -> np.ndarray:
    """LLaVA-1.5: (pad to square), resize the shortest edge to S (HF's int() of the long side), centre crop."""
    if cfg.do_pad and rgb.width != rgb.height:
        side = max(rgb.size)
        colour = tuple(int(x * 255) for x in cfg.image_mean)
        square = Image.new("RGB", (side, side), colour)     # type: ignore[arg-type]
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        rgb = square
    s = cfg.image_size
    width, height = rgb.size
    short, long = min(height, width), max(height, width)
    new_long = int(s * long / short)
    new_h, new_w = (new_long, s) if width <= height else (s, new_long)
    resized = np.asarray(rgb.resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - s) // 2, (new_w - s) // 2
    return resized[top:top + s, left:left + s]


def _anyres_crops(rgb: Image.Image, cfg: LlavaPreprocessConfig) -> list[np.ndarray]:
    """LLaVA-NeXT: [the whole image at S x S] + the S x S crops of the padded pinpoint canvas, row-major."""
    s = cfg.image_size
    width, height = rgb.size
    target_h, target_w = select_best_resolution(height, width, cfg.image_grid_pinpoints)
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.ceil(height * (target_w / width)), target_h)
    else:
        new_h, new_w = target_h, min(math.ceil(width * (target_h / height)), target_w)
    resized = np.asarray(rgb.resize((new_w, new_h), Image.Resampling.BICUBIC))
    canvas = np.zeros((target_h, target_w, 3), dtype=np.uint8)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = resized
    base = np.asarray(rgb.resize((s, s), Image.Resampling.BICUBIC))
    crops = [canvas[i:i + s, j:j + s] for i in range(0, target_h, s) for j in range(0, target_w, s)]
    return [base, *crops]


def _pinpoints(value: object, size: int) -> tuple[tuple[int, int], ...]:
    field = f"{FIELD}.image_grid_pinpoints"
    if not isinstance(value, (list, tuple)):
        raise FieldError(field, f"must be a list of [height, width] pairs, got {value!r}")
    out = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= size and v % size == 0 for v in pair)):
            raise FieldError(f"{field}[{i}]", f"must be [height, width], positive multiples of image_size ({size}), "
                                              f"got {pair!r}")
        out.append((int(pair[0]), int(pair[1])))
    return tuple(out)
