"""Vision-language families served side by side: one server holding a Qwen2-VL and an InternVL2.5 engine.

Requests with images of two sizes to each engine, sent at once from four threads, are in flight
together in the server (each engine's own in-flight batch, both families' encoders and the shared front end);
each must get exactly the greedy tokens its engine gives it alone in this process (`VLReference`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from grpc_service.client import NativeClient, chat_message, image_proto
from tests.helpers import media
from grpc_service.proto import trtserve_pb2 as pb
from tests.helpers.grpc_fixtures import VL_GREEDY, VL_SERVER_ARGS, ServerProcess, VLReference

PRESETS = ("tiny-qwen2-vl", "tiny-internvl2.5")


@pytest.fixture(scope="module")
def engine_dirs(build_tiny: Callable[..., Path]) -> dict[str, Path]:
    return {preset: build_tiny(preset) for preset in PRESETS}


@pytest.fixture(scope="module")
def server(engine_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [arg for path in engine_dirs.values() for arg in ("--engine", str(path))]
    process = ServerProcess.start([*args, *VL_SERVER_ARGS], tmp_path_factory.mktemp("grpc-vl-families-logs"))
    yield process
    process.stop()


def test_two_families_in_flight_equal_alone(server: ServerProcess, engine_dirs: dict[str, Path]) -> None:
    references = {preset: VLReference(path) for preset, path in engine_dirs.items()}
    with NativeClient(server.target, timeout_s=120) as client:
        names = {card.name for card in client.models()}
        model_of = {preset: next(n for n in names if n.startswith(preset)) for preset in PRESETS}
        sizes = [(300, 60), (60, 180)]
        jobs = [(preset, media.gradient_png(w, h, seed=20 + i)) for preset in PRESETS for i, (w, h) in enumerate(sizes)]
        expected = [references[preset].greedy(references[preset].chat(
            {"type": "image", "image": png}, {"type": "text", "text": "What is it?"})) for preset, png in jobs]

        def ask(job: tuple[str, bytes]):
            preset, png = job
            return client.chat([chat_message("user", image_proto(png), "What is it?")], VL_GREEDY,
                               model=model_of[preset])

        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(ask, jobs))
        assert [c.token_ids for c in got] == [ids for _, ids in expected]
        for name in model_of.values():
            status = wait_idle_model(client, name)
            assert status.num_in_flight == 0 and status.kv_used_blocks == 0, (name, status)


def wait_idle_model(client: NativeClient, name: str) -> pb.EngineStatus:
    """Poll one of several served engines until nothing is in flight and no KV block is held (or 10 s pass)."""
    deadline = time.monotonic() + 10
    while True:
        status = client.model_info(name).status
        if (status.num_in_flight == 0 and status.kv_used_blocks == 0) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)
