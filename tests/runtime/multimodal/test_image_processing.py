"""Preprocessing equals HF's Qwen2-VL image processor (PIL backend) bit for bit.

Reference: `transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.
Qwen2VLImageProcessorPil`, built offline from the same values as our config.
Images: exact equality (same Pillow bicubic resize of the same uint8 image, same
float64 rescale and float32 normalise). Videos: HF's video processor needs
torchvision, so they are checked (a) against HF's image processor frame by frame
(exact) and (b) against a float64 reference written from HF's documented patch
layout, within 1e-6 (float32 rounding of values of magnitude <= 2.2).
"""
from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen

from runtime.errors import FieldError
from runtime.multimodal.image_io import ImageLimits, decode_image
from runtime.families.qwen2_vl.preprocess import PreprocessConfig, preprocess_image, preprocess_video, smart_resize
from runtime.multimodal.image_processing import ProcessedVisual

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
SMALL_MAX_PIXELS = 28 * 28 * 256           # keeps HF fast; large inputs are scaled down
QWEN_MAX_PIXELS = 28 * 28 * 1280 * 4 * 4   # 12845056, Qwen2-VL's preprocessor_config value


def config_dict(**overrides: object) -> dict:
    d = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 56 * 56,
         "max_pixels": SMALL_MAX_PIXELS, "image_mean": MEAN, "image_std": STD,
         "rescale_factor": 1 / 255}
    d.update(overrides)
    return d


def hf_processor(cfg: PreprocessConfig):
    return hf_qwen.Qwen2VLImageProcessorPil(
        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        rescale_factor=cfg.rescale_factor)


@pytest.fixture(scope="module")
def cfg() -> PreprocessConfig:
    return PreprocessConfig.from_dict(config_dict())


@pytest.fixture(scope="module")
def hf(cfg: PreprocessConfig):
    return hf_processor(cfg)


def hf_run(processor, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
    out = processor(images=[image], return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGB":
        return rgb
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        return Image.fromarray(np.dstack([np.asarray(rgb), alpha]), "RGBA")
    if mode == "LA":
        return random_image(width, height, "RGBA", seed).convert("LA")
    if mode == "P+transparency":
        pal = rgb.quantize(16)
        pal.info["transparency"] = 3
        return pal
    if mode == "RGB+transparency":
        keyed = rgb.copy()
        keyed.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[0, 0])
        return keyed
    return rgb.convert(mode)


def assert_equal_to_hf(ours: ProcessedVisual, reference: tuple[np.ndarray, tuple]) -> None:
    pixels, grid = reference
    assert ours.grid_thw == grid
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == pixels.shape
    np.testing.assert_array_equal(ours.pixel_values, pixels)


# -- images against HF -------------------------------------------------------------------

SIZES = [(1, 1), (28, 28), (37, 53), (1000, 7), (7, 1000), (200, 1), (640, 480),
         (480, 640), (448, 448), (2000, 1500), (1013, 509)]


@pytest.mark.parametrize("width,height", SIZES)
def test_sizes_equal_hf(width: int, height: int, cfg, hf) -> None:
    image = random_image(width, height, seed=width * 7 + height)
    assert_equal_to_hf(preprocess_image(image, cfg), hf_run(hf, image))


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "P+transparency", "CMYK", "1",
                                  "RGB+transparency"])
def test_modes_equal_hf(mode: str, cfg, hf) -> None:
    image = random_image(61, 45, mode, seed=3)
    assert_equal_to_hf(preprocess_image(image, cfg), hf_run(hf, image))


def test_qwen_default_max_pixels_equal_hf() -> None:
    cfg = PreprocessConfig.from_dict(config_dict(max_pixels=QWEN_MAX_PIXELS))
    image = random_image(1280, 720, seed=5)
    ours = preprocess_image(image, cfg)
    assert_equal_to_hf(ours, hf_run(hf_processor(cfg), image))
    assert ours.grid_thw == (1, 52, 92)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P+transparency"),
                                      ("JPEG", "CMYK"), ("PNG", "LA"), ("WEBP", "RGBA"),
                                      ("GIF", "P")])
def test_encoded_bytes_equal_hf(fmt: str, mode: str, cfg, hf) -> None:
    buffer = io.BytesIO()
    random_image(97, 131, mode, seed=11).save(buffer, fmt)
    data = buffer.getvalue()
    ours = preprocess_image(decode_image(data, "images[0]", ImageLimits()), cfg)
    assert_equal_to_hf(ours, hf_run(hf, Image.open(io.BytesIO(data))))


def test_exif_orientation_matches_hf_load_image(cfg, hf) -> None:
    from transformers.image_utils import load_image
    image = random_image(90, 40, seed=8)
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    data = buffer.getvalue()
    ours = decode_image(data, "images[0]", ImageLimits())
    assert ours.size == (40, 90)
    reference = load_image(base64.b64encode(data).decode())   # HF's bytes path
    assert_equal_to_hf(preprocess_image(ours, cfg), hf_run(hf, reference))


def test_sixteen_bit_is_scaled_not_clipped(cfg, hf) -> None:
    # HF clips I;16 to 255 (a white image); we scale 0..65535 to 0..255.
    grey = np.random.default_rng(4).integers(0, 256, (33, 47), dtype=np.uint8)
    wide = Image.fromarray(grey.astype(np.uint16) * 257)
    assert wide.mode == "I;16"
    as_eight_bit = Image.fromarray(grey, "L")
    assert_equal_to_hf(preprocess_image(wide, cfg), hf_run(hf, as_eight_bit))
    assert_equal_to_hf(preprocess_image(wide.convert("I"), cfg), hf_run(hf, as_eight_bit))


def test_smart_resize_equals_hf_on_many_sizes(cfg) -> None:
    rng = np.random.default_rng(9)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 5000, (300, 2))
             if max(h, w) / min(h, w) <= 200]
    for height, width in sizes + [(1, 200), (200, 1), (1, 1), (56, 56), (27, 29)]:
        expected = hf_qwen.smart_resize(height, width, factor=cfg.factor,
                                        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        assert smart_resize(height, width, cfg) == expected, (height, width)


@pytest.mark.parametrize("width,height", [(201, 1), (1, 100000), (100000, 1)])
def test_aspect_ratio_above_200_refused_like_hf(width: int, height: int, cfg) -> None:
    with pytest.raises(ValueError):
        hf_qwen.smart_resize(height, width, factor=cfg.factor)
    with pytest.raises(FieldError, match=r"^images\[2\]: .*aspect ratio .* limit of 200"):
        smart_resize(height, width, cfg, field="images[2]")


def test_448_square_is_256_tokens() -> None:
    cfg = PreprocessConfig.from_dict(config_dict(max_pixels=QWEN_MAX_PIXELS))
    visual = preprocess_image(random_image(448, 448), cfg)
    assert visual.grid_thw == (1, 32, 32)
    assert visual.pixel_values.shape == (1024, 3 * 2 * 14 * 14)
    assert visual.num_tokens == 256
    assert visual.kind == "image" and visual.second_per_grid_t == 0.0


def test_content_hash_depends_on_pixels_and_kind(cfg) -> None:
    a = random_image(64, 64, seed=1)
    b = random_image(64, 64, seed=2)
    assert preprocess_image(a, cfg).content_hash == preprocess_image(a.copy(), cfg).content_hash
    assert preprocess_image(a, cfg).content_hash != preprocess_image(b, cfg).content_hash
    image, video = preprocess_image(a, cfg), preprocess_video([a, a], cfg, fps=2.0)
    np.testing.assert_array_equal(image.pixel_values, video.pixel_values)
    assert image.grid_thw == video.grid_thw
    assert image.content_hash != video.content_hash
    # Qwen2.5-VL's time positions depend on the fps, so the K/V of the same frames at another fps differ
    slower = preprocess_video([a, a], cfg, fps=1.0)
    np.testing.assert_array_equal(slower.pixel_values, video.pixel_values)
    assert slower.content_hash != video.content_hash
    assert preprocess_video([a, a], cfg, fps=2.0).content_hash == video.content_hash


# -- videos ------------------------------------------------------------------------------

def reference_video_patches(frames: list[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """float64, element by element from HF's layout: row (t, bh, bw, mh, mw), column (c, tt, y, x)."""
    width, height = frames[0].size
    new_h, new_w = smart_resize(height, width, cfg)
    pixels = [np.asarray(f.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC),
                         dtype=np.float64) for f in frames]
    t_size, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    while len(pixels) % t_size:
        pixels.append(pixels[-1])
    video = (np.stack(pixels) * cfg.rescale_factor - np.array(cfg.image_mean)) / np.array(cfg.image_std)
    grid_t, grid_h, grid_w = len(pixels) // t_size, new_h // p, new_w // p
    rows = []
    for t in range(grid_t):
        for bh in range(grid_h // m):
            for bw in range(grid_w // m):
                for mh in range(m):
                    for mw in range(m):
                        y0, x0 = (bh * m + mh) * p, (bw * m + mw) * p
                        block = video[t * t_size:(t + 1) * t_size, y0:y0 + p, x0:x0 + p, :]
                        rows.append(block.transpose(3, 0, 1, 2).reshape(-1))   # (c, tt, y, x)
    return np.stack(rows)


@pytest.mark.parametrize("num_frames", [1, 2, 3, 4, 7])
def test_video_patches_equal_float64_reference(num_frames: int, cfg) -> None:
    frames = [random_image(100, 62, seed=20 + i) for i in range(num_frames)]
    visual = preprocess_video(frames, cfg, fps=2.0)
    expected = reference_video_patches(frames, cfg)
    assert visual.grid_thw[0] == math.ceil(num_frames / 2)
    assert visual.pixel_values.shape == expected.shape
    np.testing.assert_allclose(visual.pixel_values, expected, rtol=0, atol=1e-6)


def test_video_frames_equal_hf_image_processor_per_frame(cfg, hf) -> None:
    frames = [random_image(75, 130, seed=40 + i) for i in range(4)]
    visual = preprocess_video(frames, cfg, fps=4.0)
    t, h, w = visual.grid_thw
    assert (t, visual.second_per_grid_t, visual.kind) == (2, 0.5, "video")
    assert visual.num_tokens == t * h * w // 4
    # Columns are (C, T, P, P); an HF image row holds its frame twice along T.
    ours = visual.pixel_values.reshape(t, h * w, 3, 2, 14 * 14)
    for index, frame in enumerate(frames):
        hf_pixels, hf_grid = hf_run(hf, frame)
        assert hf_grid == (1, h, w)
        hf_frame = hf_pixels.reshape(h * w, 3, 2, 14 * 14)[:, :, 0]
        np.testing.assert_array_equal(ours[index // 2, :, :, index % 2], hf_frame)


def test_video_frames_must_share_a_size(cfg) -> None:
    frames = [random_image(64, 64), random_image(64, 65)]
    with pytest.raises(FieldError, match=r"^videos\[0\]\[1\]: frame is 64x65, frame 0 is 64x64"):
        preprocess_video(frames, cfg, fps=2.0, field="videos[0]")


@pytest.mark.parametrize("fps", [0.0, -1.0, float("nan"), float("inf")])
def test_video_fps_must_be_positive(fps: float, cfg) -> None:
    with pytest.raises(FieldError, match=r"^video\.fps: "):
        preprocess_video([random_image(64, 64)], cfg, fps=fps)


def test_empty_video_refused(cfg) -> None:
    with pytest.raises(FieldError, match="no frames"):
        preprocess_video([], cfg, fps=2.0)


# -- PreprocessConfig ----------------------------------------------------------------------

def test_config_round_trip(cfg) -> None:
    assert cfg.factor == 28
    assert cfg.image_mean == tuple(MEAN) and cfg.image_std == tuple(STD)
    assert isinstance(cfg.rescale_factor, float)


@pytest.mark.parametrize("overrides,field", [
    ({"patch_size": 0}, "preprocessing.patch_size"),
    ({"merge_size": True}, "preprocessing.merge_size"),
    ({"temporal_patch_size": 2.0}, "preprocessing.temporal_patch_size"),
    ({"min_pixels": -1}, "preprocessing.min_pixels"),
    ({"max_pixels": 100}, "preprocessing.max_pixels"),
    ({"image_mean": [0.5, 0.5]}, "preprocessing.image_mean"),
    ({"image_mean": [0.5, float("nan"), 0.5]}, "preprocessing.image_mean[1]"),
    ({"image_std": [0.5, 0.0, 0.5]}, "preprocessing.image_std"),
    ({"rescale_factor": 0}, "preprocessing.rescale_factor"),
    ({"rescale_factor": "1/255"}, "preprocessing.rescale_factor"),
    ({"do_normalize": False}, "preprocessing.do_normalize"),
])
def test_config_rejects_bad_fields(overrides: dict, field: str) -> None:
    with pytest.raises(FieldError) as info:
        PreprocessConfig.from_dict(config_dict(**overrides))
    assert info.value.field == field


def test_config_rejects_missing_key() -> None:
    d = config_dict()
    del d["max_pixels"]
    with pytest.raises(FieldError, match=r"^preprocessing\.max_pixels: missing"):
        PreprocessConfig.from_dict(d)
    with pytest.raises(FieldError, match=r"^preprocessing: must be an object"):
        PreprocessConfig.from_dict([1, 2])  # type: ignore[arg-type]
