"""Images and video through both APIs against a real server on the tiny Qwen2.5-VL engine.

Qwen2.5-VL differs from Qwen2-VL where a server could go wrong unnoticed: its vision tower attends within
windows (the tiny preset's window is 2x2 merged tokens, so every image here spans several), and a video's
time positions depend on its fps (`tokens_per_second * temporal_patch_size / fps` per frame group). The
greedy tokens through each API must equal `EngineCore` + `MultimodalProcessor` in this process.
"""
from __future__ import annotations

import numpy as np

from grpc_service.client import (
    NativeClient,
    TritonClient,
    chat_message,
    image_proto,
    video_proto,
)
from runtime.multimodal.image_io import decode_image
from tests.helpers import media
from tests.helpers.grpc_fixtures import (
    IMAGE_BLOCK,
    VIDEO_BLOCK,
    VL_GREEDY,
    VLReference,
    vl_server_fixtures,
)


engine_dir, server, client, triton, reference = vl_server_fixtures("tiny-qwen2.5-vl")


# ------------------------------------------------------------------------------------------- native API


def test_chat_with_one_image_matches_the_runtime(client: NativeClient, reference: VLReference) -> None:
    png = media.gradient_png(112, 84, seed=1)
    prompt = reference.chat({"type": "image", "image": png}, {"type": "text", "text": "Describe it."})
    expected_text, expected_ids = reference.greedy(prompt)
    completion = client.chat([chat_message("user", image_proto(png), "Describe it.")], VL_GREEDY)
    assert completion.token_ids == expected_ids and completion.text == expected_text
    assert completion.prompt_tokens == len(prompt[0])


def test_chat_with_two_images_of_different_sizes_matches_the_runtime(client: NativeClient,
                                                                     reference: VLReference) -> None:
    first, second = media.gradient_png(112, 84, seed=1), media.gradient_png(56, 140, seed=2)
    prompt = reference.chat({"type": "image", "image": first}, {"type": "text", "text": "and"},
                            {"type": "image", "image": second}, {"type": "text", "text": "differ how?"})
    assert [v.grid_thw for v in prompt[1].visuals] == [(1, 6, 8), (1, 10, 4)]
    expected_text, expected_ids = reference.greedy(prompt)
    completion = client.chat([chat_message("user", image_proto(first), "and", image_proto(second), "differ how?")],
                             VL_GREEDY)
    assert completion.token_ids == expected_ids and completion.text == expected_text
    assert completion.prompt_tokens == len(prompt[0])


def test_video_fps_sets_the_time_positions_through_the_server(client: NativeClient,
                                                              reference: VLReference) -> None:
    """The same frames at two fps (neither the default 2): one prompt of tokens, two of positions, two
    answers; the server must give each its own (it must neither drop the fps nor reuse the other's K/V)."""
    frames = [media.gradient_png(56, 56, seed=s) for s in range(16)]
    decoded = [decode_image(frame, "frame", reference.limits) for frame in frames]
    text = "Describe the video."
    prompts = {fps: reference.chat({"type": "video", "video": decoded, "fps": fps}, {"type": "text", "text": text})
               for fps in (1.0, 4.0)}
    (ids_slow, mm_slow), (ids_fast, mm_fast) = prompts[1.0], prompts[4.0]
    assert ids_slow == ids_fast and not np.array_equal(mm_slow.mrope_positions, mm_fast.mrope_positions)
    expected = {fps: reference.greedy(prompt) for fps, prompt in prompts.items()}
    assert expected[1.0][1] != expected[4.0][1]
    for fps in (1.0, 4.0):
        completion = client.chat([chat_message("user", video_proto(frames, fps=fps), text)], VL_GREEDY)
        assert (completion.text, completion.token_ids) == expected[fps], fps
    # a text prompt's `videos` carry the fps too
    expected_text, expected_ids = reference.greedy(reference.processor.process_text(text, [], [(decoded, 4.0)]))
    completion = client.generate(text, VL_GREEDY, videos=[video_proto(frames, fps=4.0)])
    assert completion.token_ids == expected_ids and completion.text == expected_text


# ------------------------------------------------------------------------------------------- KServe ensemble


def test_ensemble_image_and_video_inputs_match_the_runtime(triton: TritonClient, reference: VLReference) -> None:
    image = media.gradient(112, 84, seed=3)
    frames = [media.gradient(56, 56, seed=s) for s in range(8)]
    pixels = np.asarray(image)
    video = np.stack([np.asarray(frame) for frame in frames])          # taken as 2 frames per second
    for text, images, videos in ((f"{IMAGE_BLOCK}Describe it.", [image], []),
                                 (f"{VIDEO_BLOCK}What moves?", [], [(frames, 2.0)]),
                                 (f"{VIDEO_BLOCK} then {IMAGE_BLOCK} compared?", [image], [(frames, 2.0)])):
        expected_text, _ = reference.greedy(reference.processor.process_text(text, images, videos))
        got = triton.generate(text, VL_GREEDY, images=[pixels] if images else [], videos=[video] if videos else [])
        assert got == expected_text, text
