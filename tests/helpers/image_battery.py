"""The bad-image battery every vision-language family is served against (REFERENCE.md's bad-input list).

What it is for: one list of images a server must refuse with a clear INVALID_ARGUMENT naming the field
(truncated, corrupt, decompression-bomb header, 100000x1, above the pixel limit) and one it must serve
(1x1, CMYK, 16-bit, palette, animated), the words no refusal may leak, and the checks through the native
API (chat part and text prompt's `images`), the KServe ensemble and the OpenAI API, shared by the
Qwen2-VL, InternVL and LLaVA server tests; and the ensemble's good-image case (pixels and a data URL)
that the InternVL and LLaVA server tests run against the in-process reference.
Not for: starting servers or computing the expected answers (tests/helpers/grpc_fixtures.py).
"""
from __future__ import annotations

import base64
from collections.abc import Callable

import grpc
import numpy as np

from PIL import Image

from grpc_service.client import NativeClient, TritonClient, chat_message, image_proto
from tests.helpers import media
from tests.helpers.grpc_fixtures import VL_GREEDY, ServerProcess, VLReference, assert_idle

INTERNALS = ("Traceback", "PIL", "Errno", "cannot identify", "UnidentifiedImageError", "zlib", "struct")
REFUSED: dict[str, Callable[[], bytes]] = {
    "truncated": media.truncated_png,
    "corrupt": media.corrupt_bytes,
    "bomb header": media.bomb_png_header,
    "100000x1": lambda: media.encode(media.gradient(100_000, 1)),
    "too many pixels": lambda: media.gradient_png(600, 600),
}
ACCEPTED: dict[str, Callable[[], bytes]] = {
    "1x1": lambda: media.gradient_png(1, 1),
    "CMYK": media.cmyk_jpeg,
    "16-bit": media.sixteen_bit_png,
    "palette": media.palette_png,
    "animated": media.animated_gif,
}


def native_image_error(client: NativeClient, data: bytes, as_chat: bool) -> grpc.RpcError | None:
    try:
        if as_chat:
            client.chat([chat_message("user", image_proto(data), "What is it?")], VL_GREEDY)
        else:
            client.generate("What is it?", VL_GREEDY, images=[data])
    except grpc.RpcError as exc:
        return exc
    return None


def assert_refused_natively(client: NativeClient, data: bytes, name: str) -> None:
    """INVALID_ARGUMENT naming the chat part / the images entry, with no internals in the message."""
    for as_chat, field in ((True, "chat.messages[0].parts[0].image"), (False, "images[0]")):
        error = native_image_error(client, data, as_chat)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert error.details().startswith(field + ": "), error.details()
        assert not any(word in error.details() for word in INTERNALS), error.details()


def assert_refused_by_ensemble(triton: TritonClient, data: bytes) -> None:
    encoded = np.frombuffer(data, dtype=np.uint8).reshape(1, 1, -1)
    try:
        triton.generate("What is it?", VL_GREEDY, images=[encoded])
    except RuntimeError as exc:
        assert "image_bytes_input[0]" in str(exc) and not any(word in str(exc) for word in INTERNALS), str(exc)
        return
    raise AssertionError("the ensemble served a bad image")


def assert_refused_by_openai(oa: object, model: str, data: bytes, mime: str = "image/png") -> None:
    """400 with `param` naming the image_url part, no internals in the message."""
    import openai

    url = f"data:{mime};base64," + base64.b64encode(data).decode()
    try:
        oa.chat.completions.create(  # type: ignore[attr-defined]
            model=model, max_tokens=VL_GREEDY.max_tokens, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "What is it?"}]}])
    except openai.BadRequestError as exc:
        assert exc.body["param"].startswith("messages[0].content[0].image"), exc.body
        assert not any(word in str(exc.body) for word in INTERNALS), exc.body
        return
    raise AssertionError("the OpenAI API served a bad image")


def assert_refused_by_every_api(server: ServerProcess, client: NativeClient, triton: TritonClient, name: str) -> None:
    """REFUSED[name] refused natively, by the ensemble and by the OpenAI API; the server idle and serving after."""
    from tests.helpers.openai_helpers import openai_client

    data = REFUSED[name]()
    assert_refused_natively(client, data, name)
    assert_refused_by_ensemble(triton, data)
    assert_refused_by_openai(openai_client(server), client.models()[0].name, data)
    assert_idle(client)
    assert client.generate("Still serving?", VL_GREEDY).finish_reason in ("stop", "length")


def assert_ensemble_images_match_the_runtime(triton: TritonClient, reference: VLReference, image_block: str,
                                             width: int, height: int) -> None:
    """`image_block` + "Describe it." through the KServe ensemble, once with decoded pixels (`image_bytes_input`,
    a width x height gradient) and once with a PNG data URL (`image_url_input`): the runtime's greedy text."""
    pixels = np.asarray(media.gradient(width, height, seed=3))
    text = f"{image_block}Describe it."
    expected_text, _ = reference.greedy(reference.processor.process_text(text, [Image.fromarray(pixels)]))
    assert triton.generate(text, VL_GREEDY, images=[pixels]) == expected_text
    png = media.gradient_png(56, 84, seed=4)
    expected_text, _ = reference.greedy(reference.processor.process_text(text, [png]))
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert triton.generate(text, VL_GREEDY, image_urls=[data_url]) == expected_text
