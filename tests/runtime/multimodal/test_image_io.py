"""Decoding untrusted image / video bytes: limits from the header, clear field errors, modes."""
from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from runtime.errors import FieldError
from runtime.multimodal.image_io import (
    DEFAULT_VIDEO_FPS,
    ImageLimits,
    check_image,
    check_num_images,
    decode_image,
    decode_video,
    sample_frame_indices,
)

LIMITS = ImageLimits()
NOT_AN_IMAGE = "not a decodable image (corrupt, truncated or unsupported format"


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose IHDR claims width x height (RGB, 8 bit)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def gif_header_only(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + descriptor + b"\x08\x01\x00\x00;"


def webp_vp8x_header(width: int, height: int) -> bytes:
    body = b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records every pixel decode (ImageFile.load) so tests can prove none happened."""
    calls: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self):  # type: ignore[no-untyped-def]
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# -- decompression bombs and size limits ----------------------------------------------------

@pytest.mark.parametrize("data", [
    png_header_only(100_000, 100_000),
    png_header_only(5000, 5000),        # below Pillow's own bomb threshold
    gif_header_only(60_000, 60_000),
    png_header_only(2**31 - 1, 2**31 - 1),
], ids=["png-100000x100000", "png-5000x5000", "gif-60000x60000", "png-2^31"])
def test_bombs_refused_from_header_without_decoding(data: bytes, load_calls: list) -> None:
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(FieldError) as info:
        decode_image(data, "images[1]", LIMITS)
    assert len(data) < 100
    assert info.value.field == "images[1]"
    assert str(LIMITS.max_image_pixels) in str(info.value)
    assert load_calls == []
    assert Image.MAX_IMAGE_PIXELS == max_pixels_before


def test_webp_bomb_refused_before_pillow_opens_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_open(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("Image.open must not be reached")
    monkeypatch.setattr(Image, "open", refuse_open)
    with pytest.raises(FieldError, match=r"^images\[0\]: image is 16000x16000 = 256000000 pixels; "
                                         r"the limit is 16777216$"):
        decode_image(webp_vp8x_header(16000, 16000), "images[0]", LIMITS)


def test_encoded_size_limit() -> None:
    data = encode(noise(64, 64), "PNG")
    limits = ImageLimits(max_image_bytes=len(data) - 1)
    with pytest.raises(FieldError, match=rf"^images\[0\]: image is {len(data)} bytes; "
                                         rf"the limit is {len(data) - 1}$"):
        decode_image(data, "images[0]", limits)


def test_pixel_limit_is_configurable(load_calls: list) -> None:
    with pytest.raises(FieldError, match=r"image is 64x64 = 4096 pixels; the limit is 4095"):
        decode_image(encode(noise(64, 64), "PNG"), "images[0]", ImageLimits(max_image_pixels=4095))
    assert load_calls == []


@pytest.mark.parametrize("width,height", [(100_000, 1), (1, 100_000), (201, 1)])
def test_thin_images_refused_from_header(width: int, height: int, load_calls: list) -> None:
    with pytest.raises(FieldError, match=rf"^images\[3\]: image is {width}x{height}: aspect ratio "
                                         r".* above the limit of 200$"):
        decode_image(png_header_only(width, height), "images[3]", LIMITS)
    assert load_calls == []


@pytest.mark.parametrize("width,height", [(1, 1), (200, 1), (1, 150)])
def test_tiny_and_thin_within_ratio_accepted(width: int, height: int) -> None:
    image = decode_image(encode(noise(width, height), "PNG"), "images[0]", LIMITS)
    assert image.size == (width, height) and image.mode == "RGB"


def test_min_image_side_refuses_smaller() -> None:
    with pytest.raises(FieldError, match=r"each side must be at least 2 pixel"):
        decode_image(encode(noise(1, 5), "PNG"), "images[0]", ImageLimits(min_image_side=2))


# -- corrupt input ----------------------------------------------------------------------------

def corrupt_inputs() -> list[bytes]:
    png = encode(noise(64, 64), "PNG")
    jpeg = encode(noise(64, 64), "JPEG")
    bad_crc = bytearray(png)
    bad_crc[40] ^= 0xFF
    return [b"garbage", png[:len(png) // 2], png[:30], jpeg[:len(jpeg) // 2], jpeg[:200],
            bytes(bad_crc), b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            b"\xff\xd8\xff" + b"\0" * 50, encode(noise(8, 8), "ICO")]


@pytest.mark.parametrize("data", corrupt_inputs())
def test_corrupt_or_unsupported_bytes_give_one_fixed_message(data: bytes) -> None:
    with pytest.raises(FieldError) as info:
        decode_image(data, "images[0]", LIMITS)
    assert str(info.value).startswith("images[0]: " + NOT_AN_IMAGE)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("data,message", [
    (b"", "image is empty"),
    ("not bytes", "expected encoded image bytes, got str"),
    (None, "expected encoded image bytes, got NoneType"),
])
def test_wrong_payloads(data: object, message: str) -> None:
    with pytest.raises(FieldError, match=rf"^images\[0\]: {message}$"):
        decode_image(data, "images[0]", LIMITS)  # type: ignore[arg-type]


# -- modes, alpha, animation, EXIF ---------------------------------------------------------------

def test_rgba_is_composited_onto_white() -> None:
    pixels = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 255, 128]]], dtype=np.uint8)
    image = decode_image(encode(Image.fromarray(pixels, "RGBA"), "PNG"), "images[0]", LIMITS)
    assert image.mode == "RGB"
    out = np.asarray(image)
    assert out[0, 0].tolist() == [255, 255, 255]          # transparent -> white, not red
    assert out[0, 1].tolist() == [0, 0, 255]
    assert out[0, 2].tolist() == [127, 127, 255]          # alpha_composite rounding


def test_palette_transparency_becomes_white() -> None:
    palette = Image.new("P", (4, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1, 0, 1])
    image = decode_image(encode(palette, "PNG", transparency=0), "images[0]", LIMITS)
    assert np.asarray(image)[0].tolist() == [[255, 255, 255], [0, 255, 0]] * 2


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("LA", "PNG"), ("P", "GIF"), ("CMYK", "JPEG"),
                                      ("CMYK", "TIFF"), ("1", "BMP"), ("RGB", "WEBP"),
                                      ("RGB", "JPEG")])
def test_modes_decode_to_rgb(mode: str, fmt: str) -> None:
    image = decode_image(encode(noise(33, 21).convert(mode), fmt), "images[0]", LIMITS)
    assert image.mode == "RGB" and image.size == (33, 21)


def test_sixteen_bit_png_is_scaled_to_eight_bits() -> None:
    grey = np.array([[0, 1, 128, 255]], dtype=np.uint16)
    data = encode(Image.fromarray(grey * 257), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = decode_image(data, "images[0]", LIMITS)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_animated_gif_as_image_is_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    image = decode_image(data, "images[0]", LIMITS)
    assert np.asarray(image)[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied() -> None:
    source = noise(6, 4, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6                                    # displayed rotated 90 degrees clockwise
    image = decode_image(encode(source, "PNG", exif=exif), "images[0]", LIMITS)
    expected = source.transpose(Image.Transpose.ROTATE_270)
    assert image.size == (4, 6)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


def test_check_image_applies_the_same_rules() -> None:
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert np.asarray(check_image(rgba, "images[0]", LIMITS))[0, 0].tolist() == [255, 255, 255]
    with pytest.raises(FieldError, match=r"^images\[4\]: image is 300x1: aspect ratio"):
        check_image(Image.new("RGB", (300, 1)), "images[4]", LIMITS)
    with pytest.raises(FieldError, match=r"^images\[0\]: expected image bytes or a PIL image"):
        check_image(b"bytes", "images[0]", LIMITS)  # type: ignore[arg-type]


def test_too_many_images() -> None:
    check_num_images(8, "images", LIMITS)
    with pytest.raises(FieldError, match=r"^images: 9 images/videos given; the limit is 8 per request$"):
        check_num_images(9, "images", LIMITS)


def test_limits_validate_themselves() -> None:
    with pytest.raises(FieldError, match=r"^max_image_pixels: must be an integer >= 1, got 0$"):
        ImageLimits(max_image_pixels=0)


# -- video ------------------------------------------------------------------------------------------

def colour(index: int) -> tuple[int, int, int]:
    return ((index * 40) % 256, 255 - (index * 13) % 256, (index * 97) % 256)


def animation(num_frames: int, fmt: str, duration_ms: int, size: tuple[int, int] = (16, 12)) -> bytes:
    frames = [Image.new("RGB", size, colour(i)) for i in range(num_frames)]
    params: dict = {"save_all": True, "append_images": frames[1:], "duration": duration_ms}
    if fmt == "WEBP":
        params["lossless"] = True
    return encode(frames[0], fmt, **params)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_sampled_to_two_fps(fmt: str) -> None:
    data = animation(20, fmt, duration_ms=100)                      # 10 fps, 2 s
    frames, fps = decode_video(data, "videos[0]", LIMITS)
    assert fps == pytest.approx(2.0)
    assert len(frames) == 4                                          # 2 s * 2 fps
    for frame, source_index in zip(frames, [0, 5, 10, 15]):
        assert frame.mode == "RGB" and frame.size == (16, 12)
        assert np.asarray(frame)[0, 0].tolist() == list(colour(source_index))


def test_long_animation_capped_at_max_frames() -> None:
    data = animation(60, "GIF", duration_ms=50)                      # 20 fps, 3 s
    frames, fps = decode_video(data, "videos[0]", ImageLimits(max_video_frames=5),
                               target_fps=10.0)
    assert len(frames) == 4                                          # 30 wanted, 5 max, even
    assert fps == pytest.approx(4 * 20 / 60)


def test_short_animations_keep_at_least_four_frames_or_all() -> None:
    frames, fps = decode_video(animation(6, "GIF", 500), "videos[0]", LIMITS)   # 3 s at 2 fps
    assert len(frames) == 6 and fps == pytest.approx(2.0)
    frames, fps = decode_video(animation(8, "GIF", 100), "videos[0]", LIMITS)   # 0.8 s
    assert len(frames) == 4 and fps == pytest.approx(5.0)                       # min 4 frames
    frames, _ = decode_video(animation(3, "GIF", 100), "videos[0]", LIMITS)
    assert len(frames) == 2
    frames, _ = decode_video(encode(noise(9, 9), "PNG"), "videos[0]", LIMITS)
    assert len(frames) == 1                                          # padded by the preprocessor


def test_animation_frame_count_limit() -> None:
    with pytest.raises(FieldError, match=r"^videos\[0\]: video has 12 frames; the limit is 10$"):
        decode_video(animation(12, "GIF", 100), "videos[0]", ImageLimits(max_video_source_frames=10))


def test_animation_decode_budget() -> None:
    limits = ImageLimits(max_video_decoded_pixels=10 * 16 * 12 - 1)   # two passes over 5 frames
    with pytest.raises(FieldError, match=r"^videos\[0\]: decoding would touch 1920 pixels"):
        decode_video(animation(5, "GIF", 100), "videos[0]", limits)


def test_video_frame_bomb_refused(load_calls: list) -> None:
    with pytest.raises(FieldError, match=r"^videos\[0\]: image header declares too many pixels"):
        decode_video(gif_header_only(60_000, 60_000), "videos[0]", LIMITS)
    with pytest.raises(FieldError, match=r"^videos\[0\]: image is 2000x2000 = 4000000 pixels; "
                                         r"the limit is 2097152$"):
        decode_video(png_header_only(2000, 2000), "videos[0]", LIMITS)
    assert load_calls == []


def test_corrupt_video_fixed_message() -> None:
    frames = [noise(64, 64, seed=i) for i in range(6)]
    gif, webp, apng = (encode(frames[0], fmt, save_all=True, append_images=frames[1:])
                       for fmt in ("GIF", "WEBP", "PNG"))
    # Cuts inside frame data (a GIF cut between frames is a valid, shorter GIF to Pillow).
    for bad in [gif[:900], webp[: len(webp) // 2], apng[: len(apng) // 2], b"nonsense bytes"]:
        with pytest.raises(FieldError, match=r"^videos\[0\]: not a decodable video \(corrupt"):
            decode_video(bad, "videos[0]", LIMITS)


def test_frame_list_kept_as_given() -> None:
    given = [Image.new("RGBA", (10, 8), (*colour(i), 255)) for i in range(5)]
    frames, fps = decode_video(given, "videos[1]", LIMITS, fps=4.0)
    assert len(frames) == 5 and fps == 4.0
    assert all(frame.mode == "RGB" for frame in frames)
    frames, fps = decode_video(given[:2], "videos[1]", LIMITS)
    assert fps == DEFAULT_VIDEO_FPS


def test_frame_list_above_max_is_sampled() -> None:
    given = [Image.new("RGB", (4, 4), colour(i)) for i in range(100)]
    frames, fps = decode_video(given, "videos[0]", ImageLimits(max_video_frames=64), fps=10.0)
    assert len(frames) == 64 and fps == pytest.approx(6.4)


def test_frame_list_errors_name_the_frame() -> None:
    with pytest.raises(FieldError, match=r"^videos\[0\]\[1\]: expected a PIL image, got bytes$"):
        decode_video([Image.new("RGB", (4, 4)), b"x"], "videos[0]", LIMITS)
    with pytest.raises(FieldError, match=r"^videos\[0\]: video has no frames$"):
        decode_video([], "videos[0]", LIMITS)
    with pytest.raises(FieldError, match=r"^videos\[0\]\.fps: must be a finite number > 0"):
        decode_video([Image.new("RGB", (4, 4))], "videos[0]", LIMITS, fps=float("nan"))


def test_mp4_without_pyav_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "av", None)                    # import av -> ImportError
    mp4_start = struct.pack(">I", 24) + b"ftypisom" + b"\0" * 16
    with pytest.raises(FieldError, match=r"^videos\[0\]: .*PyAV.*'video' extra"):
        decode_video(mp4_start, "videos[0]", LIMITS)


@pytest.mark.parametrize("container_format", ["mp4", "matroska", "avi"])
def test_container_video_with_pyav(container_format: str) -> None:
    av = pytest.importorskip("av")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(30):                                     # 3 s at 10 fps
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 48), colour(index)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    frames, fps = decode_video(buffer.getvalue(), "videos[0]", LIMITS)
    assert len(frames) == 6 and fps == pytest.approx(2.0)
    assert all(frame.size == (64, 48) and frame.mode == "RGB" for frame in frames)
    with pytest.raises(FieldError, match=r"^videos\[0\]: not a decodable video"):
        decode_video(buffer.getvalue()[:200], "videos[0]", LIMITS)


# -- sampling arithmetic ----------------------------------------------------------------------------

@pytest.mark.parametrize("num,src,target,max_frames,expected_count", [
    (300, 30.0, 2.0, 64, 20),        # 10 s at 2 fps
    (3000, 30.0, 2.0, 64, 64),       # capped
    (10, 30.0, 2.0, 64, 4),          # min 4 frames
    (3, 30.0, 2.0, 64, 2),           # floored to a multiple of 2
    (1, 30.0, 2.0, 64, 1),           # shorter than temporal_patch_size: kept
    (301, 30.0, 2.0, 63, 20),
])
def test_sample_frame_indices(num: int, src: float, target: float, max_frames: int,
                              expected_count: int) -> None:
    indices, fps = sample_frame_indices(num, src, target, 2, max_frames)
    assert len(indices) == expected_count
    assert indices == sorted(set(indices)) and 0 <= indices[0] and indices[-1] < num
    assert len(indices) % 2 == 0 or num < 2
    if num >= 2:
        assert fps == pytest.approx(len(indices) * src / num)
