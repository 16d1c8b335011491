"""Where an image URL in a request may point, and reading its bytes under that policy.

What it is for: `read_image_url(url, field, policy)`, for image and video URLs
of both APIs:

* `data:` URLs (base64 or percent-encoded) are always accepted;
* `file://` URLs and plain paths are read only from inside
  `policy.allowed_dir` (symlinks resolved first, so a link pointing out of it
  is refused); without an allowed directory every local path is refused;
* `http://` / `https://` only when `policy.allow_fetch` is set, with a
  timeout, a byte limit (the Content-Length header and the bytes actually
  read), and redirects followed only to http(s);
* anything else is refused.

Every refusal is an `InvalidArgument` naming the field; messages never carry
OS or network error texts. Reading blocks: call it from a worker thread.
Not for: decoding images (runtime.multimodal.image_io).
"""
from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from grpc_service.errors import InvalidArgument

MAX_URL_CHARS_SHOWN = 80


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    allowed_dir: Path | None = None      # file:// and paths: only inside this directory; None refuses them
    allow_fetch: bool = False            # http(s):// URLs
    fetch_timeout_s: float = 10.0
    max_bytes: int = 20 << 20            # per image: data: URLs, files and downloads alike


def read_image_url(url: str, field: str, policy: UrlPolicy) -> bytes:
    """The bytes `url` names, or InvalidArgument(field, ...) saying which rule refused it."""
    if not url:
        raise InvalidArgument(field, "is empty; give a data:, file:// or http(s):// URL")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _read_data_url(url, field, policy.max_bytes)
    if scheme in ("http", "https"):
        if not policy.allow_fetch:
            raise InvalidArgument(field, f"{scheme}:// URLs are refused: this server does not fetch images "
                                         "(start it with --allow-image-url-fetch, or send the bytes)")
        return _fetch(url, field, policy)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(field, "file:// URLs must name a local file (no host)")
        return _read_file(urllib.request.url2pathname(parsed.path), field, policy)
    if scheme and len(scheme) > 1:          # a one-letter "scheme" would be a Windows drive
        raise InvalidArgument(field, f"URL scheme {scheme[:16]!r} is not supported "
                                     "(data:, file://, http(s)://, or a path)")
    return _read_file(url, field, policy)


def _read_data_url(url: str, field: str, max_bytes: int) -> bytes:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise InvalidArgument(field, "data: URL has no ',' before its data")
    is_base64 = header.lower().endswith(";base64")
    if is_base64:
        if len(payload) // 4 * 3 > max_bytes + 3:
            raise InvalidArgument(field, f"data: URL holds more than the limit of {max_bytes} bytes")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(field, "data: URL is not valid base64") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise InvalidArgument(field, f"data: URL holds {len(data)} bytes (limit {max_bytes})")
    return data


def _read_file(raw_path: str, field: str, policy: UrlPolicy) -> bytes:
    if policy.allowed_dir is None:
        raise InvalidArgument(field, "local files are refused: this server has no allowed image directory "
                                     "(--allowed-image-dir)")
    root = policy.allowed_dir.resolve()
    path = Path(raw_path)
    if "\x00" in raw_path:
        raise InvalidArgument(field, "path holds a NUL character")
    try:
        resolved = (path if path.is_absolute() else root / path).resolve(strict=True)
    except (OSError, RuntimeError):       # missing, unreadable, or a symlink loop
        raise InvalidArgument(field, "no such file in the allowed image directory") from None
    if not resolved.is_relative_to(root):
        raise InvalidArgument(field, "path is outside the allowed image directory")
    if not resolved.is_file():
        raise InvalidArgument(field, "is not a regular file in the allowed image directory")
    try:
        size = resolved.stat().st_size
        if size > policy.max_bytes:
            raise InvalidArgument(field, f"file holds {size} bytes (limit {policy.max_bytes})")
        with resolved.open("rb") as handle:
            data = handle.read(policy.max_bytes + 1)
    except OSError:
        raise InvalidArgument(field, "the file cannot be read") from None
    if len(data) > policy.max_bytes:
        raise InvalidArgument(field, f"file holds more than {policy.max_bytes} bytes")
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            return None                   # urllib then raises HTTPError for the redirect itself
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, field: str, policy: UrlPolicy) -> bytes:
    opener = urllib.request.build_opener(_HttpOnlyRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "trtserve", "Accept": "image/*,video/*"})
    shown = url[:MAX_URL_CHARS_SHOWN]
    try:
        with opener.open(request, timeout=policy.fetch_timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise InvalidArgument(field, f"{shown!r} is {length} bytes (limit {policy.max_bytes})")
            data = response.read(policy.max_bytes + 1)
    except InvalidArgument:                       # the size refusal above (a ValueError too): as it is
        raise
    except urllib.error.HTTPError as exc:
        raise InvalidArgument(field, f"fetching {shown!r} failed with HTTP status {exc.code}") from None
    except (TimeoutError, OSError, ValueError, urllib.error.URLError):
        raise InvalidArgument(field, f"fetching {shown!r} failed (unreachable, or no answer within "
                                     f"{policy.fetch_timeout_s:g} s)") from None
    if len(data) > policy.max_bytes:
        raise InvalidArgument(field, f"{shown!r} holds more than {policy.max_bytes} bytes")
    return data
