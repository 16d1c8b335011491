"""`normalise` by table lookup (normalise_table / normalise_channels) equals `normalise` bit for bit, and
content_hash tells pixels apart by dtype and shape as well as bytes."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.multimodal.image_processing import content_hash, normalise, normalise_channels, normalise_table

CONFIGS = [
    (1 / 255, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),   # CLIP / Qwen2-VL
    (1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    (0.00392156862745098, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),                   # ImageNet / InternVL
    (1 / 127.5, (-1.0, 0.0, 2.0), (3.0, 1e-3, 0.7)),
]


@pytest.mark.parametrize("rescale, mean, std", CONFIGS)
def test_table_lookup_equals_normalise_bit_for_bit(rescale: float, mean: tuple, std: tuple) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 3, 2, 49), dtype=np.uint8)
    pixels[0, :, 0, :] = np.arange(49) * 5 + 10        # with every channel's extremes and many values
    pixels[1, :, 0, :2] = (0, 255)
    expected = normalise(pixels.transpose(0, 2, 3, 1), rescale, mean, std).transpose(0, 3, 1, 2)
    out = np.full(pixels.shape, np.nan, dtype=np.float32)
    normalise_channels(pixels, normalise_table(rescale, mean, std), out)
    assert np.array_equal(out.view(np.uint32), np.ascontiguousarray(expected).view(np.uint32))


def test_table_holds_every_uint8_value() -> None:
    rescale, mean, std = CONFIGS[0]
    table = normalise_table(rescale, mean, std)
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    assert table.shape == (3, 256) and table.dtype == np.float32
    assert np.array_equal(table.T.view(np.uint32), normalise(values, rescale, mean, std).view(np.uint32))


def test_lookup_refuses_non_uint8_pixels() -> None:
    table = normalise_table(*CONFIGS[0])
    with pytest.raises(ValueError, match="uint8"):
        normalise_channels(np.zeros((2, 3, 4), np.int64), table, np.zeros((2, 3, 4), np.float32))


def test_content_hash_covers_dtype_and_shape() -> None:
    pixels = np.arange(24, dtype=np.uint8)
    same = content_hash("image", (1, 2, 2), 0.0, pixels.reshape(4, 6))
    assert same == content_hash("image", (1, 2, 2), 0.0, pixels.reshape(4, 6).copy())
    assert same != content_hash("image", (1, 2, 2), 0.0, pixels.reshape(6, 4))
    assert same != content_hash("image", (1, 2, 2), 0.0, pixels.view(np.int8).reshape(4, 6))
    assert same != content_hash("video", (1, 2, 2), 0.0, pixels.reshape(4, 6))
