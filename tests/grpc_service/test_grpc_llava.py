"""LLaVA-NeXT images through the native API, the KServe ensemble and the OpenAI API against a real server.

The tiny LLaVA-NeXT engine (anyres crops, unpadding, image_newline rows, `<image>` expanded per image
from its size) behind `trtserve-serve`: the greedy tokens through each API must equal `EngineCore` +
`MultimodalProcessor` in this process (tests/runtime/test_llava_parity.py ties those to HF), and the
bad-image battery (tests/helpers/image_battery.py) is refused, naming the field, through each API.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main as bench_main
from grpc_service.client import NativeClient, TritonClient, chat_message, image_proto
from tests.helpers import media
from tests.helpers.grpc_fixtures import VL_GREEDY, ServerProcess, VLReference, assert_idle, vl_server_fixtures
from tests.helpers.image_battery import (ACCEPTED, REFUSED, assert_ensemble_images_match_the_runtime,
                                         assert_refused_by_every_api)

IMAGE_BLOCK = "<image>\n"


engine_dir, server, client, triton, reference = vl_server_fixtures("tiny-llava-next")


def test_native_chat_and_text_prompt_match_the_runtime(client: NativeClient, reference: VLReference) -> None:
    wide, tall = media.gradient_png(90, 50, seed=1), media.gradient_png(40, 120, seed=2)
    prompt = reference.chat({"type": "image", "image": wide}, {"type": "text", "text": "and"},
                            {"type": "image", "image": tall}, {"type": "text", "text": "differ how?"})
    assert [v.grid_thw for v in prompt[1].visuals] == [(5, 2, 2, 50, 90, 2, 2), (4, 2, 2, 120, 40, 3, 1)]
    expected_text, expected_ids = reference.greedy(prompt)
    completion = client.chat([chat_message("user", image_proto(wide), "and", image_proto(tall), "differ how?")],
                             VL_GREEDY)
    assert (completion.token_ids, completion.text) == (expected_ids, expected_text)
    assert completion.prompt_tokens == len(prompt[0])
    # a text prompt without <image>: one "<image>\n" per image goes first, as HF's llava prompts read
    expected_text, expected_ids = reference.greedy(reference.processor.process_text("Describe.", [wide]))
    completion = client.generate("Describe.", VL_GREEDY, images=[wide])
    assert completion.token_ids == expected_ids and completion.text == expected_text
    assert_idle(client)


def test_ensemble_image_bytes_and_url_inputs_match_the_runtime(triton: TritonClient,
                                                               reference: VLReference) -> None:
    assert_ensemble_images_match_the_runtime(triton, reference, IMAGE_BLOCK, 70, 33)


def test_openai_image_url_matches_the_runtime(server: ServerProcess, client: NativeClient,
                                              reference: VLReference) -> None:
    from tests.helpers.openai_helpers import assert_image_url_matches_the_runtime

    png = media.gradient_png(100, 60, seed=5)
    assert_image_url_matches_the_runtime(server, client.models()[0].name, reference, png)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_images_are_refused_by_every_api(server: ServerProcess, client: NativeClient, triton: TritonClient,
                                             name: str) -> None:
    assert_refused_by_every_api(server, client, triton, name)


def test_unusual_but_valid_images_are_served(client: NativeClient, reference: VLReference) -> None:
    for name, make in sorted(ACCEPTED.items()):
        data = make()
        expected = reference.greedy(reference.chat({"type": "image", "image": data},
                                                   {"type": "text", "text": "What is it?"}))
        got = client.chat([chat_message("user", image_proto(data), "What is it?")], VL_GREEDY)
        assert got.token_ids == expected[1], name
    assert_idle(client)


def test_bench_with_images_records_the_hf_baseline_beside_the_server(server: ServerProcess, engine_dir: Path,
                                                                     tmp_path: Path) -> None:
    """trtserve-bench --baseline hf on a LLaVA engine (issue 17's `make bench` row): both systems' rows, and HF's
    prompts (LlavaNextProcessor's "<image>\\n" per image + text) count what the server counted."""
    out = tmp_path / "bench"
    rc = bench_main(["--target", f"grpc://{server.target}", "--metrics-url",
                     f"http://127.0.0.1:{server.metrics_port}/metrics", "--protocol", "native",
                     "--images-per-request", "1:2", "--image-size", "64", "--input-len", "8", "--output-len", "3",
                     "--concurrency", "2", "--requests", "3", "--warmup", "0", "--baseline", "hf",
                     "--engine", str(engine_dir), "--no-progress", "--no-plot", "--out", str(out)])
    assert rc == 0
    native, hf = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert hf["system"] == "hf-transformers"
    (ours,), (theirs,) = native["levels"], hf["levels"]
    assert (ours["num_requests"], ours["num_errors"], theirs["num_requests"], theirs["num_errors"]) == (3, 0, 3, 0)
    assert ours["output_tokens"] == theirs["output_tokens"] == 9
    assert theirs["prompt_tokens"] == ours["prompt_tokens"] == ours["server_tokens"]["prompt_tokens"] > 3 * 8 + 10
