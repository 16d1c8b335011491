"""The image URL policy, the ensemble's image tensor layouts, and the server's image options, without a server."""
from __future__ import annotations

import base64
import http.server
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grpc_service.config import ServerConfig, ServerConfigError
from grpc_service.errors import InvalidArgument
from grpc_service.image_urls import UrlPolicy, read_image_url
from grpc_service.visual_inputs import (
    FieldNames,
    ImageSource,
    MediaPolicy,
    VideoSource,
    VisualFrontend,
    pixel_images,
    pixel_video,
)
from runtime.errors import FieldError
from runtime.multimodal.image_io import ImageLimits


@pytest.fixture()
def allowed(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "a.png").write_bytes(b"inside")
    (tmp_path / "outside.png").write_bytes(b"outside")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    return root


def _refused(url: str, policy: UrlPolicy, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        read_image_url(url, "images[0].url", policy)
    assert info.value.field == "images[0].url" and words in info.value.message, info.value.message


def test_data_urls(allowed: Path) -> None:
    policy = UrlPolicy(max_bytes=16)
    assert read_image_url("data:image/png;base64," + base64.b64encode(b"png bytes").decode(), "f", policy) == \
        b"png bytes"
    assert read_image_url("data:,a%20b", "f", policy) == b"a b"
    _refused("data:image/png;base64,***", policy, "base64")
    _refused("data:image/png;base64," + base64.b64encode(b"x" * 17).decode(), policy, "limit")
    _refused("data:image/png;base64" + "AAAA", policy, "','")


def test_local_files_only_inside_the_allowed_directory(allowed: Path) -> None:
    policy = UrlPolicy(allowed_dir=allowed)
    assert read_image_url(str(allowed / "a.png"), "f", policy) == b"inside"
    assert read_image_url("file://" + str(allowed / "a.png"), "f", policy) == b"inside"
    assert read_image_url("a.png", "f", policy) == b"inside"
    _refused(str(allowed / "link.png"), policy, "outside the allowed")          # symlink out of it
    _refused(str(allowed / ".." / "outside.png"), policy, "outside the allowed")
    _refused("../outside.png", policy, "outside the allowed")
    _refused(str(allowed / "missing.png"), policy, "no such file")
    _refused(str(allowed), policy, "not a regular file")
    _refused("file://otherhost/a.png", policy, "no host")
    _refused(str(allowed / "a.png"), UrlPolicy(), "--allowed-image-dir")
    _refused(str(allowed / "a.png"), UrlPolicy(allowed_dir=allowed, max_bytes=3), "limit 3")


def test_other_schemes_are_refused() -> None:
    _refused("https://example.com/a.png", UrlPolicy(), "--allow-image-url-fetch")
    _refused("ftp://example.com/a.png", UrlPolicy(allow_fetch=True), "not supported")
    _refused("", UrlPolicy(), "empty")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "file:///etc/hostname")
            self.end_headers()
            return
        body = b"x" * (100 if self.path == "/big" else 10)
        self.send_response(200 if self.path != "/missing" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def http_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_fetch_with_the_flag(http_url: str) -> None:
    policy = UrlPolicy(allow_fetch=True, fetch_timeout_s=5, max_bytes=50)
    assert read_image_url(http_url + "/small", "f", policy) == b"x" * 10
    _refused(http_url + "/big", policy, "limit 50")
    _refused(http_url + "/missing", policy, "HTTP status 404")
    _refused(http_url + "/redirect", policy, "HTTP status 302")                  # no redirect to file://
    _refused("http://127.0.0.1:9/unreachable.png", policy, "failed")
    _refused(http_url + "/small", UrlPolicy(), "--allow-image-url-fetch")


def test_ensemble_image_layouts() -> None:
    hwc = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    images = pixel_images(hwc, "image_bytes_input")
    assert [s.field for s in images] == ["image_bytes_input[0]", "image_bytes_input[1]"]
    assert images[1].pixels is not None and np.array_equal(images[1].pixels, hwc[1])
    chw = pixel_images(hwc.transpose(0, 3, 1, 2), "image_bytes_input")
    assert chw[0].pixels is not None and np.array_equal(chw[0].pixels, hwc[0])
    encoded = np.zeros((2, 1, 1, 6), dtype=np.uint8)
    encoded[0, 0, 0, :4] = [1, 2, 3, 4]
    rows = pixel_images(encoded, "image_bytes_input")
    assert rows[0].data == bytes([1, 2, 3, 4, 0, 0]) and rows[0].pixels is None      # padding kept for the decoder
    with pytest.raises(InvalidArgument, match="neither RGB"):
        pixel_images(np.zeros((1, 4, 4, 2), np.uint8), "image_bytes_input")
    video = pixel_video(hwc, "video_bytes_input")
    assert video.pixels is not None and video.pixels.shape == (2, 4, 5, 3)
    assert pixel_video(np.zeros((1, 1, 1, 9), np.uint8), "video_bytes_input").data == bytes(9)


def test_runtime_field_names_become_the_clients() -> None:
    names = FieldNames({"messages": "chat.messages", "messages[0].content[1]": "chat.messages[0].parts[1]",
                        "text": "text_input"})
    assert names.rename("messages[0].content[1].image") == "chat.messages[0].parts[1].image"
    assert names.rename("messages[0].content[10]") == "chat.messages[0].content[10]"   # not a prefix match
    assert names.rename("messages") == "chat.messages"
    assert names.rename("textual") == "textual"
    error = names.error(FieldError("text", "has 2 placeholders"))
    assert error.field == "text_input" and error.message == "text_input: has 2 placeholders"


def test_server_image_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"engine_dirs": (tmp_path,)}
    config = ServerConfig(**base, max_images_per_request=2, allowed_image_dir=tmp_path).validate()
    assert config.image_limits().max_images_per_request == 2 and config.url_policy().allowed_dir == tmp_path
    for name, value in (("max_images_per_request", 0), ("max_image_pixels", True), ("image_fetch_timeout_s", 0.0),
                        ("allowed_image_dir", tmp_path / "missing")):
        with pytest.raises(ServerConfigError, match=name):
            ServerConfig(**base, **{name: value}).validate()
    monkeypatch.setenv("TRTSERVE_SERVER_ALLOWED_IMAGE_DIR", str(tmp_path))
    monkeypatch.setenv("TRTSERVE_SERVER_ALLOW_IMAGE_URL_FETCH", "1")
    monkeypatch.setenv("TRTSERVE_SERVER_MAX_IMAGE_PIXELS", "1024")
    config = ServerConfig.from_env(engine_dirs=(tmp_path,))
    # URL reads are capped at the larger default byte limit: 64 MiB for a video (20 MiB for an image)
    assert config.url_policy() == UrlPolicy(tmp_path, True, 10.0, 64 << 20)
    assert config.image_limits().max_image_pixels == 1024


def _frontend(limits: ImageLimits) -> VisualFrontend:
    """A frontend without an engine: enough for turning sources into the processor's inputs."""
    frontend = VisualFrontend.__new__(VisualFrontend)
    frontend.policy = MediaPolicy(limits)
    return frontend


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


def test_sources_reach_the_processor_undecoded() -> None:
    """Pixels and frames are handed on as PIL images for the processor to check once; encoded frames are
    decoded once, and a frame above the video frame limit is refused under the client's name for it."""
    frontend = _frontend(ImageLimits(max_video_frame_pixels=1000))
    pixels = np.zeros((4, 6, 3), np.uint8)
    image = frontend._image(ImageSource("image_bytes_input[0]", pixels=pixels))
    assert isinstance(image, Image.Image) and image.size == (6, 4)
    frames, fps = frontend._video(VideoSource("video_bytes_input", pixels=np.zeros((3, 4, 6, 3), np.uint8)))
    assert [f.size for f in frames] == [(6, 4)] * 3 and fps is None
    frames, fps = frontend._video(VideoSource("videos[0]", frames=(_png(8, 8), _png(8, 8)), fps=4.0))
    assert [f.size for f in frames] == [(8, 8)] * 2 and fps == 4.0
    with pytest.raises(FieldError) as info:
        frontend._video(VideoSource("videos[0]", frames=(_png(8, 8), _png(40, 40))))
    assert info.value.field == "videos[0].frames[1]" and "the limit is 1000" in str(info.value)
