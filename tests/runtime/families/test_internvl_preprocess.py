"""InternVL tiling equals HF's InternVL image processor (GotOcr2ImageProcessorPil, crop_to_patches) bit for bit.

Reference: `transformers.models.got_ocr2.image_processing_pil_got_ocr2` built offline with InternVL2.5's
values (448 tiles, 1-12, ImageNet mean / std). Images: exact equality of every tile (same grid choice, same
Pillow bicubic resizes of the same uint8 image, same float64 rescale and float32 normalise). Video frames:
HF's InternVL video processor needs torchvision, so each frame is checked against HF's image processor
without tiling (crop_to_patches=False, one 448 tile), exact; that is the documented reference for video.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as hf_got

from runtime.errors import FieldError
from runtime.families.internvl.preprocess import (
    TilingConfig,
    num_tiles,
    preprocess_frames,
    preprocess_tiled_image,
    tile_grid,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def config_dict(**overrides: object) -> dict:
    d = {"tile_size": 448, "patch_size": 14, "min_tiles": 1, "max_tiles": 12, "use_thumbnail": True,
         "image_mean": MEAN, "image_std": STD, "rescale_factor": 1 / 255}
    d.update(overrides)
    return d


@pytest.fixture(scope="module")
def cfg() -> TilingConfig:
    return TilingConfig.from_dict(config_dict())


@pytest.fixture(scope="module")
def small() -> TilingConfig:
    """112-pixel tiles: the same code paths as 448 at a sixteenth of the pixels (the tiny preset's tiles)."""
    return TilingConfig.from_dict(config_dict(tile_size=112))


def hf_processor(cfg: TilingConfig, crop: bool = True) -> hf_got.GotOcr2ImageProcessorPil:
    return hf_got.GotOcr2ImageProcessorPil(
        size={"height": cfg.tile_size, "width": cfg.tile_size}, crop_to_patches=crop, min_patches=cfg.min_tiles,
        max_patches=cfg.max_tiles, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        rescale_factor=cfg.rescale_factor)


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def test_448_tiles_equal_hf(cfg: TilingConfig) -> None:
    image = random_image(800, 300, seed=11)
    ours = preprocess_tiled_image(image, cfg)
    out = hf_processor(cfg)(images=[image], return_tensors="np")
    assert int(out["num_patches"][0]) == ours.grid_thw[0] == num_tiles(300, 800, cfg) == 11   # 5x2 + thumbnail
    assert ours.grid_thw[1:] == (32, 32) and ours.merge_size == 2 and ours.num_tokens == 256 * 11
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape == (11, 3, 448, 448)
    np.testing.assert_array_equal(ours.pixel_values, out["pixel_values"])


@pytest.mark.parametrize("width,height,mode", [
    (112, 112, "RGB"), (2000, 200, "RGB"), (120, 900, "RGB"), (31, 17, "RGB"), (300, 300, "L"),
    (1, 1, "RGB"), (5000, 1, "RGB"), (640, 480, "RGBA"), (333, 222, "P")])
def test_tiles_equal_hf(small: TilingConfig, width: int, height: int, mode: str) -> None:
    image = random_image(width, height, mode, seed=width + height)
    ours = preprocess_tiled_image(image, small)
    out = hf_processor(small)(images=[image], return_tensors="np")
    assert int(out["num_patches"][0]) == ours.grid_thw[0] == num_tiles(height, width, small)
    assert ours.grid_thw[1:] == (8, 8) and ours.num_tokens == 16 * ours.grid_thw[0]
    np.testing.assert_array_equal(ours.pixel_values, out["pixel_values"])


def test_grid_choice_equals_hf_over_many_shapes(cfg: TilingConfig) -> None:
    """Pure arithmetic: the (columns, rows) choice and the tile count over 2500 sizes, ties included."""
    processor = hf_processor(cfg)
    for height in range(50, 5000, 99):
        for width in range(37, 6000, 121):
            want = hf_got.get_optimal_tiled_canvas((height, width), (448, 448), 1, 12)
            assert tile_grid(height, width, cfg) == want, (width, height)
            assert num_tiles(height, width, cfg) == processor.get_number_of_image_patches(height, width, {
                "crop_to_patches": True}), (width, height)


def test_no_thumbnail_and_tile_limits() -> None:
    cfg = TilingConfig.from_dict(config_dict(use_thumbnail=False, max_tiles=6, tile_size=112))
    image = random_image(900, 150, seed=3)
    ours = preprocess_tiled_image(image, cfg)
    assert tile_grid(150, 900, cfg) == (6, 1) and ours.grid_thw == (6, 8, 8) and ours.num_tokens == 6 * 16


def test_video_frames_equal_hf_single_tile(small: TilingConfig) -> None:
    frames = [random_image(320, 200, seed=40 + i) for i in range(3)]
    ours = preprocess_frames(frames, small)
    out = hf_processor(small, crop=False)(images=frames, return_tensors="np")
    assert [(v.kind, v.grid_thw, v.num_tokens) for v in ours] == [("video", (1, 8, 8), 16)] * 3
    np.testing.assert_array_equal(np.concatenate([v.pixel_values for v in ours]), out["pixel_values"])


def test_content_hash_follows_pixels(small: TilingConfig) -> None:
    a, b = random_image(500, 300, seed=1), random_image(500, 300, seed=2)
    assert preprocess_tiled_image(a, small).content_hash == preprocess_tiled_image(a.copy(), small).content_hash
    assert preprocess_tiled_image(a, small).content_hash != preprocess_tiled_image(b, small).content_hash


@pytest.mark.parametrize("key,value,match", [
    ("max_tiles", 0, "max_tiles"), ("max_tiles", 100, "max_tiles"), ("tile_size", 450, "tile_size"),
    ("use_thumbnail", 1, "use_thumbnail"), ("image_std", [0.2, 0.0, 0.2], "image_std"),
    ("rescale_factor", float("nan"), "rescale_factor"), ("bogus", 1, "bogus"),
    ("image_mean", [0.5, float("nan"), 0.5], r"image_mean\[1\]")])
def test_bad_config_names_the_key(key: str, value: object, match: str) -> None:
    with pytest.raises(FieldError, match=match):
        TilingConfig.from_dict(config_dict(**{key: value}))


def test_empty_video_is_refused(cfg: TilingConfig) -> None:
    with pytest.raises(FieldError, match="no frames"):
        preprocess_frames([], cfg, field="videos[0]")
