"""LLaVA-1.5 / LLaVA-NeXT preprocessing equals HF's PIL image processors bit for bit.

References (transformers 5.x, built offline from the same values as our config):
`CLIPImageProcessorPil` (llava-hf's LLaVA-1.5 processor), `LlavaImageProcessorPil`
with do_pad (pad to square with the mean colour) and `LlavaNextImageProcessorPil`
(anyres). Exact equality: the same Pillow bicubic resizes of the same uint8
image, float64 rescale, float32 normalise. The token counts equal HF's
`LlavaProcessor` / `LlavaNextProcessor` arithmetic.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from runtime.errors import FieldError
from runtime.families.llava.preprocess import LlavaPreprocessConfig, preprocess_llava

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
PINPOINTS_28 = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]     # the 336-px grid scaled by 1/12
# (width, height): landscape / portrait, thin, 1x1, square, ones that take every pinpoint shape
SIZES = [(40, 30), (30, 40), (97, 23), (23, 97), (56, 56), (1, 1), (300, 7), (13, 200), (90, 50), (70, 33)]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _cfg(size: int, **extra: object) -> LlavaPreprocessConfig:
    return LlavaPreprocessConfig.from_dict({"image_size": size, "image_mean": MEAN, "image_std": STD,
                                            "rescale_factor": 1 / 255, **extra})


@pytest.mark.parametrize("kind", ["clip", "llava_pad", "next"])
def test_equals_hf_processor(kind: str) -> None:
    if kind == "next":
        hf = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=PINPOINTS_28, image_mean=MEAN, image_std=STD)
        cfg = _cfg(28, image_grid_pinpoints=PINPOINTS_28)
    else:
        hf_class = CLIPImageProcessorPil if kind == "clip" else LlavaImageProcessorPil
        extra = {"do_pad": True} if kind == "llava_pad" else {}
        hf = hf_class(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_mean=MEAN,
                      image_std=STD, **extra)
        cfg = _cfg(56, **extra)
    for image in _images():
        ref = hf(image, return_tensors="np")["pixel_values"][0]
        ours = preprocess_llava(image, cfg)
        if kind != "next":
            ref = ref[None]
        assert ours.dtype == np.float32 and ours.shape == ref.shape, (image.size, ours.shape, ref.shape)
        assert np.array_equal(ours, ref), image.size


def test_real_shape_next_grid_matches_hf() -> None:
    """One 640x480 photo-sized image at the real 336-px geometry: 1 + 4 crops, equal to HF."""
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=pinpoints, image_mean=MEAN, image_std=STD)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    ours = preprocess_llava(image, _cfg(336, image_grid_pinpoints=pinpoints))
    assert ours.shape == (5, 3, 336, 336)
    assert np.array_equal(ours, hf(image, return_tensors="np")["pixel_values"][0])


@pytest.mark.parametrize("bad, field", [
    ({"image_size": 0}, "preprocessing.image_size"),
    ({"image_std": [1, 0, 1]}, "preprocessing.image_std"),
    ({"image_mean": [0.5, float("inf"), 0.5]}, "preprocessing.image_mean[1]"),
    ({"rescale_factor": float("nan")}, "preprocessing.rescale_factor"),
    ({"image_grid_pinpoints": [[28, 50]]}, "preprocessing.image_grid_pinpoints[0]"),
    ({"resample": 3}, "preprocessing.resample"),
])
def test_bad_config_names_field(bad: dict, field: str) -> None:
    with pytest.raises(FieldError) as info:
        LlavaPreprocessConfig.from_dict({"image_size": 28, "image_mean": MEAN, "image_std": STD,
                                         "rescale_factor": 1 / 255, **bad})
    assert info.value.field == field


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(FieldError, match="aspect ratio"):
        preprocess_llava(Image.new("RGB", (4000, 2)), _cfg(28), field="images[0]")
