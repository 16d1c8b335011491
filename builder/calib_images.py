"""Calibration images: the bundled generated set and the image references of `--calib-data` records.

What it is for: the images a vision-language build calibrates with. A `--calib-data`
record names its images under "image" (one) or "images" (a list); each entry is either
a file path, relative to the JSONL file's own directory (or absolute), or a
`data:image/<type>;base64,<data>` URL. They are decoded here, before any work (size
limits read from the header first, then converted to RGB), and a bad one is refused with
one line naming the flag, the line and the reason. Without `--calib-data` a VL build uses `bundled_vl_samples`: small
images drawn in code from a fixed seed (gradients, shapes, stripes, checkerboards,
smooth noise; 56-224 pixels a side, so no image file ships with the project), each
paired with a question about it, interleaved with the bundled texts.
Not for: reading the JSONL itself (builder/calib_data.py) or preprocessing (the runtime's processor does).
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DATA_URL_PREFIX = "data:image/"
BUNDLED_SEED = 20261130
NUM_BUNDLED_IMAGES = 12
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096      # the server's default limit (runtime ImageLimits.max_image_pixels)
QUESTIONS = (
    "Describe this image.", "What shapes and colours do you see?", "Is there any text in the picture?",
    "What is in the middle of the image?", "Describe the pattern in one sentence.",
    "Which colour covers most of the picture?",
)


class CalibImageError(ValueError):
    """One image reference of a calibration record is unusable; the message says why (no flag, no line)."""


def load_image_ref(ref: object, base_dir: Path) -> Image.Image:
    """A path (relative to `base_dir`) or a data: URL -> decoded RGB image; CalibImageError otherwise."""
    if not isinstance(ref, str) or not ref:
        raise CalibImageError(f"an image must be a non-empty string (a path or a data: URL), got {ref!r}")
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not head.startswith(DATA_URL_PREFIX) or not head.endswith(";base64") or not sep:
            raise CalibImageError("a data: URL must look like data:image/<type>;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise CalibImageError("the data: URL holds invalid base64") from None
        label = "data: URL"
    else:
        path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
        if not path.is_file():
            raise CalibImageError(f"image {ref!r} is not a file (paths are relative to the JSONL file)")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise CalibImageError(f"image {ref!r} is larger than {MAX_IMAGE_BYTES} bytes")
        data = path.read_bytes()
        label = repr(ref)
    return _decode(data, label)


def _decode(data: bytes, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise CalibImageError(f"image {label} has {width}x{height} pixels, above {MAX_IMAGE_PIXELS}")
            image.load()
    except CalibImageError:
        raise
    except Exception as exc:     # PIL's UnidentifiedImageError, truncated data, bombs
        raise CalibImageError(f"image {label} cannot be decoded ({exc.__class__.__name__})") from None
    return image.convert("RGB")


def image_refs(record: dict[str, object]) -> list[object]:
    """The record's image entries in order ("image": one, "images": a list); CalibImageError if malformed."""
    refs: list[object] = []
    if "image" in record:
        refs.append(record["image"])
    if "images" in record:
        many = record["images"]
        if not isinstance(many, list) or not many:
            raise CalibImageError('"images" must be a non-empty list')
        refs.extend(many)
    return refs


def generated_image(index: int, seed: int = BUNDLED_SEED) -> Image.Image:
    """The index-th bundled calibration image, drawn from (seed, index): the same pixels on every machine."""
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(56, 225, size=2))
    kind = index % 5
    colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(4)]
    if kind == 0:                                  # two-colour gradient
        t = np.linspace(0.0, 1.0, width)[None, :, None]
        row = (1 - t) * np.array(colours[0]) + t * np.array(colours[1])
        pixels = np.broadcast_to(row, (height, width, 3)).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(pixels))
    elif kind == 1:                                # stripes
        period = int(rng.integers(4, 17))
        mask = (np.arange(width)[None, :] + np.arange(height)[:, None]) // period % 2
        pixels = np.where(mask[..., None] == 1, np.array(colours[0]), np.array(colours[1])).astype(np.uint8)
        image = Image.fromarray(pixels)
    elif kind == 2:                                # checkerboard
        cell = int(rng.integers(6, 25))
        mask = (np.arange(height)[:, None] // cell + np.arange(width)[None, :] // cell) % 2
        pixels = np.where(mask[..., None] == 1, np.array(colours[2]), np.array(colours[3])).astype(np.uint8)
        image = Image.fromarray(pixels)
    elif kind == 3:                                # smooth noise (upsampled)
        small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    else:                                          # plain background
        image = Image.new("RGB", (width, height), colours[0])
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):       # a few shapes on top
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + int(rng.integers(8, width // 2 + 9)), y0 + int(rng.integers(8, height // 2 + 9))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    return image


def bundled_vl_pairs(count: int = NUM_BUNDLED_IMAGES) -> list[tuple[str, Image.Image]]:
    """(question, image) pairs of the bundled VL calibration set."""
    return [(QUESTIONS[i % len(QUESTIONS)], generated_image(i)) for i in range(count)]
