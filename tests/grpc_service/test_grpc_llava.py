"""LLaVA-NeXT images through the native API, the KServe ensemble and the OpenAI API against a real server.

The tiny LLaVA-NeXT engine (anyres crops, unpadding, image_newline rows, `<image>` expanded per image
from its size) behind `trtserve-serve`: the greedy tokens through each API must equal `EngineCore` +
`MultimodalProcessor` in this process (tests/runtime/test_llava_parity.py ties those to HF), and the
bad-image battery (tests/helpers/image_battery.py) is refused, naming the field, through each API.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.cli import main as bench_main
from grpc_service.client import NativeClient, TritonClient, chat_message, image_proto
from tests.helpers import media
from tests.helpers.grpc_fixtures import VL_GREEDY, VL_SERVER_ARGS, ServerProcess, VLReference, assert_idle
from tests.helpers.image_battery import (
    ACCEPTED,
    REFUSED,
    assert_refused_by_ensemble,
    assert_refused_by_openai,
    assert_refused_natively,
)

IMAGE_BLOCK = "<image>\n"


@pytest.fixture(scope="module")
def engine_dir(build_tiny: Callable[..., Path]) -> Path:
    return build_tiny("tiny-llava-next")


@pytest.fixture(scope="module")
def server(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess.start(["--engine", str(engine_dir), *VL_SERVER_ARGS],
                                  tmp_path_factory.mktemp("grpc-llava-logs"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[NativeClient]:
    with NativeClient(server.target, timeout_s=120) as native:
        yield native


@pytest.fixture(scope="module")
def triton(server: ServerProcess) -> Iterator[TritonClient]:
    with TritonClient(server.target, timeout_s=120) as kserve:
        yield kserve


@pytest.fixture(scope="module")
def reference(engine_dir: Path) -> VLReference:
    return VLReference(engine_dir)


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
    pixels = np.asarray(media.gradient(70, 33, seed=3))
    text = f"{IMAGE_BLOCK}Describe it."
    expected_text, _ = reference.greedy(reference.processor.process_text(text, [Image.fromarray(pixels)]))
    assert triton.generate(text, VL_GREEDY, images=[pixels]) == expected_text
    png = media.gradient_png(56, 84, seed=4)
    expected_text, _ = reference.greedy(reference.processor.process_text(text, [png]))
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert triton.generate(text, VL_GREEDY, image_urls=[data_url]) == expected_text


def test_openai_image_url_matches_the_runtime(server: ServerProcess, client: NativeClient,
                                              reference: VLReference) -> None:
    from tests.helpers.openai_helpers import assert_no_extra_fields, openai_client

    png = media.gradient_png(100, 60, seed=5)
    prompt = reference.chat({"type": "image", "image": png}, {"type": "text", "text": "Describe."})
    expected = reference.greedy(prompt)
    response = openai_client(server).chat.completions.create(
        model=client.models()[0].name, max_tokens=VL_GREEDY.max_tokens, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
            {"type": "text", "text": "Describe."}]}])
    assert_no_extra_fields(response)
    assert response.choices[0].message.content == expected[0]
    assert (response.usage.completion_tokens, response.usage.prompt_tokens) == (len(expected[1]), len(prompt[0]))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_images_are_refused_by_every_api(server: ServerProcess, client: NativeClient, triton: TritonClient,
                                             name: str) -> None:
    from tests.helpers.openai_helpers import openai_client

    data = REFUSED[name]()
    assert_refused_natively(client, data, name)
    assert_refused_by_ensemble(triton, data)
    assert_refused_by_openai(openai_client(server), client.models()[0].name, data)
    assert_idle(client)
    assert client.generate("Still serving?", VL_GREEDY).finish_reason in ("stop", "length")


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
