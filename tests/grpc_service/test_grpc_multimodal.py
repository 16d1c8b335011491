"""Images and video through both APIs against a real server on the tiny Qwen2-VL engine.

The greedy tokens through each API must equal those of `EngineCore` called in this process with
`MultimodalProcessor` (which the runtime's own tests hold equal to HF). The bad images of REFERENCE.md
section 6 go through both APIs: each gets its documented answer (refusal: INVALID_ARGUMENT naming the
field, no decoder internals; accepted modes: a normal answer), and afterwards the server still serves,
with no request in flight and no KV block held.
"""
from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from grpc_service import client_cli
from grpc_service.client import (
    NativeClient,
    TritonClient,
    chat_message,
    image_proto,
    video_proto,
)
from grpc_service.proto import trtserve_pb2 as pb
from runtime.multimodal.image_io import decode_image
from tests.helpers import media
from tests.helpers.grpc_fixtures import (
    IMAGE_BLOCK,
    VIDEO_BLOCK,
    VL_GREEDY,
    VL_MAX_IMAGES,
    VL_MAX_PIXELS,
    VL_SERVER_ARGS,
    ServerProcess,
    VLReference,
    assert_idle,
)
from tests.helpers.image_battery import ACCEPTED, REFUSED, assert_refused_by_ensemble, assert_refused_natively


@pytest.fixture(scope="module")
def vl_engine_dir(build_tiny: Callable[..., Path]) -> Path:
    return build_tiny("tiny-qwen2-vl")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allowed-images")
    (root / "gradient.png").write_bytes(media.gradient_png(seed=3))
    outside = tmp_path_factory.mktemp("outside-images") / "secret.png"
    outside.write_bytes(media.gradient_png(seed=4))
    os.symlink(outside, root / "escape.png")
    return root


@pytest.fixture(scope="module")
def vl_server(vl_engine_dir: Path, image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess.start(["--engine", str(vl_engine_dir), "--allowed-image-dir", str(image_dir),
                                  *VL_SERVER_ARGS], tmp_path_factory.mktemp("grpc-vl-logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(vl_server: ServerProcess) -> Iterator[NativeClient]:
    with NativeClient(vl_server.target, timeout_s=120) as native:
        yield native


@pytest.fixture(scope="module")
def triton(vl_server: ServerProcess) -> Iterator[TritonClient]:
    with TritonClient(vl_server.target, timeout_s=120) as kserve:
        yield kserve


@pytest.fixture(scope="module")
def reference(vl_engine_dir: Path) -> VLReference:
    return VLReference(vl_engine_dir)




# ------------------------------------------------------------------------------------------- native API


def test_model_card_says_images(client: NativeClient) -> None:
    card = client.models()[0]
    assert card.supports_images
    assert card.max_images_per_request == VL_MAX_IMAGES and card.max_image_pixels == VL_MAX_PIXELS
    assert card.max_image_bytes > 0


def test_chat_with_one_image_matches_the_runtime(client: NativeClient, reference: VLReference) -> None:
    png = media.gradient_png(seed=1)
    expected_text, expected_ids = reference.greedy(reference.chat({"type": "image", "image": png},
                                                                  {"type": "text", "text": "Describe it."}))
    completion = client.chat([chat_message("user", image_proto(png), "Describe it.")], VL_GREEDY)
    assert completion.token_ids == expected_ids and completion.text == expected_text
    ids, _ = reference.chat({"type": "image", "image": png}, {"type": "text", "text": "Describe it."})
    assert completion.prompt_tokens == len(ids)
    assert client.tokenize([chat_message("user", image_proto(png), "Describe it.")]) == ids


def test_chat_with_two_images_matches_the_runtime(client: NativeClient, reference: VLReference) -> None:
    first, second = media.gradient_png(64, 48, seed=1), media.gradient_png(40, 80, seed=2)
    prompt = reference.chat({"type": "image", "image": first}, {"type": "text", "text": "and"},
                            {"type": "image", "image": second}, {"type": "text", "text": "differ how?"})
    expected_text, expected_ids = reference.greedy(prompt)
    completion = client.chat([chat_message("user", image_proto(first), "and", image_proto(second), "differ how?")],
                             VL_GREEDY)
    assert completion.token_ids == expected_ids and completion.text == expected_text
    assert len(prompt[1].visuals) == 2 and completion.prompt_tokens == len(prompt[0])


def test_video_frames_match_the_runtime(client: NativeClient, reference: VLReference) -> None:
    frames = [media.gradient_png(32, 32, seed=s) for s in range(4)]
    decoded = [decode_image(f, "frame", reference.limits) for f in frames]
    expected_text, expected_ids = reference.greedy(reference.chat(
        {"type": "video", "video": decoded, "fps": 2.0}, {"type": "text", "text": "What moves?"}))
    completion = client.chat([chat_message("user", video_proto(frames, fps=2.0), "What moves?")], VL_GREEDY)
    assert completion.token_ids == expected_ids and completion.text == expected_text


def test_animated_gif_as_video(client: NativeClient, reference: VLReference) -> None:
    gif = media.animated_gif()
    expected = reference.greedy(reference.chat({"type": "video", "video": gif, "fps": None},
                                               {"type": "text", "text": "Go."}))
    completion = client.chat([chat_message("user", video_proto(gif), "Go.")], VL_GREEDY)
    assert completion.token_ids == expected[1]


def test_text_prompt_with_images_field(client: NativeClient, reference: VLReference) -> None:
    png = media.gradient_png(seed=5)
    for text in (f"Look: {IMAGE_BLOCK} what is it?", "What is it?"):        # placeholder given, or put first
        expected = reference.greedy(reference.processor.process_text(text, [png]))
        completion = client.generate(text, VL_GREEDY, images=[png])
        assert completion.token_ids == expected[1], text


def test_text_only_on_a_vl_engine(client: NativeClient, reference: VLReference) -> None:
    prompt = "The capital of France is"
    ids = list(reference.core.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert client.generate(prompt, VL_GREEDY).token_ids == reference.greedy((ids, None))[1]
    ids = client.tokenize([("user", "hi")])
    assert client.chat([("user", "hi")], VL_GREEDY).token_ids == reference.greedy((ids, None))[1]


def test_placeholders_without_images_are_refused(client: NativeClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.generate(f"{IMAGE_BLOCK} what?", VL_GREEDY)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        client.chat([pb.ChatMessage(role="user", parts=[pb.ContentPart(text=IMAGE_BLOCK)])], VL_GREEDY)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_idle(client)


def test_native_urls_follow_the_policy(client: NativeClient, reference: VLReference, image_dir: Path) -> None:
    data_url = "data:image/png;base64," + base64.b64encode((image_dir / "gradient.png").read_bytes()).decode()
    by_url = client.generate("Describe.", VL_GREEDY, images=[data_url])
    by_file = client.generate("Describe.", VL_GREEDY, images=["file://" + str(image_dir / "gradient.png")])
    by_bytes = client.generate("Describe.", VL_GREEDY, images=[(image_dir / "gradient.png").read_bytes()])
    png = (image_dir / "gradient.png").read_bytes()
    expected = reference.greedy(reference.processor.process_text("Describe.", [png]))
    assert by_url.token_ids == by_file.token_ids == by_bytes.token_ids == expected[1]
    for url, words in (("file://" + str(image_dir / "escape.png"), "outside the allowed"),
                       ("/etc/hostname", "outside the allowed"),
                       ("http://127.0.0.1:9/x.png", "--allow-image-url-fetch")):
        with pytest.raises(grpc.RpcError) as info:
            client.generate("Describe.", VL_GREEDY, images=[url])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("images[0].url: ") and words in info.value.details()


# ------------------------------------------------------------------------------------------- KServe ensemble


def test_ensemble_declares_image_inputs(vl_server: ServerProcess, triton: TritonClient) -> None:
    config = triton.client.get_model_config("ensemble").config
    inputs = {spec.name: spec for spec in config.input}
    assert list(inputs["image_bytes_input"].dims) == [-1, -1, -1, -1]
    assert inputs["image_bytes_input"].data_type == 2          # TYPE_UINT8
    assert inputs["image_url_input"].optional and inputs["image_bytes_input"].optional


def test_ensemble_image_inputs_match_the_runtime(triton: TritonClient, reference: VLReference,
                                                 image_dir: Path) -> None:
    pixels = np.asarray(media.gradient(64, 48, seed=1))
    text = f"{IMAGE_BLOCK}Describe it."
    expected_text, _ = reference.greedy(reference.processor.process_text(text, [Image.fromarray(pixels)]))
    assert triton.generate(text, VL_GREEDY, images=[pixels]) == expected_text            # [1, N, H, W, 3]
    assert triton.generate(text, VL_GREEDY, images=[pixels.transpose(2, 0, 1)]) == expected_text   # [1, N, 3, H, W]
    png = (image_dir / "gradient.png").read_bytes()
    expected_text, _ = reference.greedy(reference.processor.process_text(text, [png]))
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert triton.generate(text, VL_GREEDY, image_urls=[data_url]) == expected_text
    assert triton.generate(text, VL_GREEDY, image_urls=["file://" + str(image_dir / "gradient.png")]) == expected_text
    assert triton.generate(text, VL_GREEDY, image_urls=["gradient.png"]) == expected_text     # relative: in the dir
    padded = np.frombuffer(png + b"\0" * 13, dtype=np.uint8).reshape(1, 1, -1)            # [1, N, 1, 1, bytes]
    assert triton.generate(text, VL_GREEDY, images=[padded]) == expected_text


def test_ensemble_video_input_matches_the_runtime(triton: TritonClient, reference: VLReference) -> None:
    frames = [media.gradient(32, 32, seed=s) for s in range(4)]
    pixels = np.stack([np.asarray(frame) for frame in frames])
    text = f"{VIDEO_BLOCK}What moves?"
    expected_text, _ = reference.greedy(reference.processor.process_text(text, [], [(frames, 2.0)]))
    reversed_text, _ = reference.greedy(reference.processor.process_text(text, [], [(frames[::-1], 2.0)]))
    assert expected_text != reversed_text                       # the frames' order shows in the answer
    assert triton.generate(text, VL_GREEDY, videos=[pixels]) == expected_text                    # [1, F, H, W, 3]
    assert triton.generate(text, VL_GREEDY, videos=[pixels.transpose(0, 3, 1, 2)]) == expected_text  # [1, F, 3, H, W]
    assert triton.generate(text, VL_GREEDY, videos=[pixels[::-1]]) == reversed_text
    gif = media.animated_gif()
    expected_text, _ = reference.greedy(reference.processor.process_text("What moves?", [], [gif]))
    encoded = np.frombuffer(gif, dtype=np.uint8).reshape(1, 1, 1, -1)                            # [1, 1, 1, 1, bytes]
    assert triton.generate("What moves?", VL_GREEDY, videos=[encoded]) == expected_text
    with pytest.raises(ValueError, match="one video per request"):
        triton.generate(text, VL_GREEDY, videos=[pixels, pixels])


def test_cli_sends_video_through_the_ensemble(vl_server: ServerProcess, reference: VLReference, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    frames = [media.gradient(32, 32, seed=s) for s in range(4)]
    paths = []
    for index, frame in enumerate(frames):
        paths += ["--video", str(tmp_path / f"frame{index}.png")]
        frame.save(paths[-1])
    (tmp_path / "clip.gif").write_bytes(media.animated_gif())
    command = ["--url", vl_server.target, "--api", "triton", "generate", "What moves?", "--max-tokens",
               str(VL_GREEDY.max_tokens)]
    assert client_cli.main([*command, *paths, "--video-frames"]) == 0
    expected_text, _ = reference.greedy(reference.processor.process_text("What moves?", [], [(frames, 2.0)]))
    assert capsys.readouterr().out == expected_text + "\n"
    assert client_cli.main([*command, "--video", str(tmp_path / "clip.gif")]) == 0
    expected_text, _ = reference.greedy(reference.processor.process_text("What moves?", [],
                                                                         [media.animated_gif()]))
    assert capsys.readouterr().out == expected_text + "\n"
    for extra, words in ((paths, "one video per request"), (["--video", "data:,x"], "not URLs"),
                         ([*paths, "--video-frames", "--video-fps", "4"], "--video-fps needs --api native")):
        assert client_cli.main([*command, *extra]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.parametrize("url, words", [
    ("escape.png", "outside the allowed"),
    ("/etc/hostname", "outside the allowed"),
    ("file:///etc/hostname", "outside the allowed"),
    ("https://example.com/cat.png", "--allow-image-url-fetch"),
    ("ftp://example.com/cat.png", "not supported"),
    ("data:image/png;base64,@@@", "base64"),
])
def test_ensemble_refuses_urls_against_the_policy(triton: TritonClient, client: NativeClient, url: str,
                                                  words: str) -> None:
    with pytest.raises(RuntimeError) as info:
        triton.generate("Describe.", VL_GREEDY, image_urls=[url])
    assert "image_url_input[0]" in str(info.value) and words in str(info.value)
    assert_idle(client)


def test_text_engine_schema_has_no_image_inputs(grpc_server: ServerProcess) -> None:
    with TritonClient(grpc_server.target) as kserve:
        names = {spec.name for spec in kserve.client.get_model_config("ensemble").config.input}
        assert not names & {"image_bytes_input", "image_url_input", "video_bytes_input"}
        with pytest.raises(RuntimeError, match="image_bytes_input"):
            kserve.generate("hi", VL_GREEDY, images=[np.asarray(media.gradient(8, 8))])


# ------------------------------------------------------------------------------------------- bad images

@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_images_are_refused_by_both_apis(client: NativeClient, triton: TritonClient, name: str) -> None:
    data = REFUSED[name]()
    assert_refused_natively(client, data, name)
    assert_refused_by_ensemble(triton, data)
    assert_idle(client)
    assert client.generate("Still serving?", VL_GREEDY).finish_reason in ("stop", "length")


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_unusual_but_valid_images_are_served_by_both_apis(client: NativeClient, triton: TritonClient,
                                                         reference: VLReference, name: str) -> None:
    data = ACCEPTED[name]()
    expected = reference.greedy(reference.processor.process_text("What is it?", [data]))
    chat_expected = reference.greedy(reference.chat({"type": "image", "image": data},
                                                    {"type": "text", "text": "What is it?"}))
    assert client.chat([chat_message("user", image_proto(data), "What is it?")], VL_GREEDY).token_ids == chat_expected[1]
    assert client.generate("What is it?", VL_GREEDY, images=[data]).token_ids == expected[1]
    encoded = np.frombuffer(data, dtype=np.uint8).reshape(1, 1, -1)
    assert triton.generate("What is it?", VL_GREEDY, images=[encoded]) == expected[0]
    assert_idle(client)


def test_raw_pixel_limits_on_the_ensemble(triton: TritonClient, client: NativeClient) -> None:
    for pixels, words in ((np.zeros((1, 100_000, 3), np.uint8), "aspect ratio"),
                          (np.zeros((600, 600, 3), np.uint8), "limit"),
                          (np.zeros((8, 8, 5), np.uint8), "neither RGB pixels")):
        with pytest.raises(RuntimeError) as info:
            triton.generate("What is it?", VL_GREEDY, images=[pixels])
        assert "image_bytes_input" in str(info.value) and words in str(info.value), str(info.value)
    assert_idle(client)


def test_too_many_images_through_both_apis(client: NativeClient, triton: TritonClient) -> None:
    images = [media.gradient_png(16, 16, seed=s) for s in range(VL_MAX_IMAGES + 1)]
    with pytest.raises(grpc.RpcError) as info:
        client.chat([chat_message("user", *[image_proto(i) for i in images], "Compare.")], VL_GREEDY)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("chat.messages: ") and str(VL_MAX_IMAGES) in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.generate("Compare.", VL_GREEDY, images=images)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("images: ")
    pixels = [np.asarray(media.gradient(16, 16, seed=s)) for s in range(VL_MAX_IMAGES + 1)]
    with pytest.raises(RuntimeError, match="image_bytes_input"):
        triton.generate("Compare.", VL_GREEDY, images=pixels)
    assert_idle(client)
    assert client.generate("Still serving?", VL_GREEDY).finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------- OpenAI HTTP


def test_openai_chat_with_image_and_video_urls(vl_server: ServerProcess, client: NativeClient,
                                               reference: VLReference, image_dir: Path) -> None:
    """image_url (data: and file:// under --allowed-image-dir) and video_url parts through the OpenAI API,
    equal to the runtime; the same policy and limits refuse what gRPC refuses, naming the part."""
    import openai

    from tests.helpers.openai_helpers import assert_no_extra_fields, openai_client

    oa = openai_client(vl_server)
    model = client.models()[0].name

    def chat(*parts: dict) -> openai.types.chat.ChatCompletion:
        return oa.chat.completions.create(model=model, messages=[{"role": "user", "content": list(parts)}],
                                          max_tokens=VL_GREEDY.max_tokens, temperature=0)

    png = media.gradient_png(seed=1)
    expected = reference.greedy(reference.chat({"type": "image", "image": png}, {"type": "text", "text": "Describe."}))
    response = chat({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                               + base64.b64encode(png).decode()}},
                    {"type": "text", "text": "Describe."})
    assert_no_extra_fields(response)
    assert response.choices[0].message.content == expected[0] and response.usage.completion_tokens == len(expected[1])
    on_disk = (image_dir / "gradient.png").read_bytes()
    expected = reference.greedy(reference.chat({"type": "image", "image": on_disk}, {"type": "text", "text": "And?"}))
    response = chat({"type": "image_url", "image_url": {"url": (image_dir / "gradient.png").as_uri()}},
                    {"type": "text", "text": "And?"})
    assert response.choices[0].message.content == expected[0]
    gif = media.animated_gif()
    expected = reference.greedy(reference.chat({"type": "video", "video": gif, "fps": None},
                                               {"type": "text", "text": "Go."}))
    response = chat({"type": "video_url", "video_url": {"url": "data:image/gif;base64,"
                                                               + base64.b64encode(gif).decode()}},
                    {"type": "text", "text": "Go."})
    assert response.choices[0].message.content == expected[0]
    refusals = {
        "messages[0].content[0].image_url.url": [{"type": "image_url", "image_url": {
            "url": (image_dir / "escape.png").as_uri()}}],
        "messages": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                + base64.b64encode(png).decode()}}] * (VL_MAX_IMAGES + 1),
    }
    for field_name, parts in refusals.items():
        with pytest.raises(openai.BadRequestError) as info:
            chat(*parts)
        assert info.value.body["param"] == field_name, info.value.body
    assert_idle(client)
