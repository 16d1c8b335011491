"""InternVL2.5 images and video through the native API, the KServe ensemble and the OpenAI API.

The tiny InternVL2.5 engine (dynamic tiles + thumbnail, `<IMG_CONTEXT>` expanded to `<img>` + 16 rows per
tile + `</img>`, video as one tile per frame) behind `trtserve-serve`: the greedy tokens through each API
must equal `EngineCore` + `MultimodalProcessor` in this process (tests/runtime/test_internvl_engine.py ties
those to HF), requests of different image sizes in flight together get what each gets alone, and the
bad-image battery (tests/helpers/image_battery.py) is refused, naming the field, through each API.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from grpc_service.client import NativeClient, TritonClient, chat_message, image_proto, video_proto
from tests.helpers import media
from tests.helpers.grpc_fixtures import VL_GREEDY, ServerProcess, VLReference, assert_idle, vl_server_fixtures
from tests.helpers.image_battery import (ACCEPTED, REFUSED, assert_ensemble_images_match_the_runtime,
                                         assert_refused_by_every_api)

IMAGE_BLOCK = "<IMG_CONTEXT>\n"


engine_dir, server, client, triton, reference = vl_server_fixtures("tiny-internvl2.5")


def test_native_chat_video_and_text_prompt_match_the_runtime(client: NativeClient, reference: VLReference) -> None:
    wide, tall = media.gradient_png(300, 60, seed=1), media.gradient_png(40, 120, seed=2)
    prompt = reference.chat({"type": "image", "image": wide}, {"type": "text", "text": "and"},
                            {"type": "image", "image": tall}, {"type": "text", "text": "differ how?"})
    assert [v.grid_thw for v in prompt[1].visuals] == [(6, 8, 8), (4, 8, 8)]     # 5x1 + thumbnail, 1x3 + thumbnail
    expected_text, expected_ids = reference.greedy(prompt)
    completion = client.chat([chat_message("user", image_proto(wide), "and", image_proto(tall), "differ how?")],
                             VL_GREEDY)
    assert (completion.token_ids, completion.text) == (expected_ids, expected_text)
    assert completion.prompt_tokens == len(prompt[0])
    gif = media.animated_gif()
    expected_text, expected_ids = reference.greedy(reference.chat({"type": "video", "video": gif, "fps": None},
                                                                  {"type": "text", "text": "Go."}))
    assert client.chat([chat_message("user", video_proto(gif), "Go.")], VL_GREEDY).token_ids == expected_ids
    # a text prompt without placeholders: one "<IMG_CONTEXT>\n" per image goes first
    expected_text, expected_ids = reference.greedy(reference.processor.process_text("Describe.", [wide]))
    completion = client.generate("Describe.", VL_GREEDY, images=[wide])
    assert completion.token_ids == expected_ids and completion.text == expected_text
    assert_idle(client)


def test_requests_of_different_image_sizes_in_flight_equal_alone(client: NativeClient,
                                                                 reference: VLReference) -> None:
    sizes = [(400, 50), (90, 160), (33, 300)]
    images = [media.gradient_png(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]
    expected = [reference.greedy(reference.chat({"type": "image", "image": png}, {"type": "text", "text": "What?"}))
                for png in images]
    with ThreadPoolExecutor(len(images)) as pool:
        got = list(pool.map(lambda png: client.chat([chat_message("user", image_proto(png), "What?")], VL_GREEDY),
                            images))
    assert [c.token_ids for c in got] == [ids for _, ids in expected]
    assert_idle(client)


def test_ensemble_image_bytes_and_url_inputs_match_the_runtime(triton: TritonClient,
                                                               reference: VLReference) -> None:
    assert_ensemble_images_match_the_runtime(triton, reference, IMAGE_BLOCK, 170, 33)


def test_openai_image_url_matches_the_runtime(server: ServerProcess, client: NativeClient,
                                              reference: VLReference) -> None:
    from tests.helpers.openai_helpers import assert_image_url_matches_the_runtime

    png = media.gradient_png(260, 90, seed=5)
    assert_image_url_matches_the_runtime(server, client.models()[0].name, reference, png)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_images_are_refused_by_every_api(server: ServerProcess, client: NativeClient, triton: TritonClient,
                                             name: str) -> None:
    assert_refused_by_every_api(server, client, triton, name)


def test_unusual_but_valid_images_are_served(client: NativeClient, reference: VLReference) -> None:
    """1x1 (tiled up), CMYK and animated; 16-bit and palette images take the same colour conversion, which
    tests/runtime/families/test_internvl_preprocess.py holds bit-identical to HF."""
    for name in ("1x1", "CMYK", "animated"):
        make = ACCEPTED[name]
        data = make()
        expected = reference.greedy(reference.chat({"type": "image", "image": data},
                                                   {"type": "text", "text": "What is it?"}))
        got = client.chat([chat_message("user", image_proto(data), "What is it?")], VL_GREEDY)
        assert got.token_ids == expected[1], name
    assert_idle(client)
