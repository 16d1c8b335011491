"""Helpers for the gRPC tests: the server launcher (shared with the demo) and reference generations from
`EngineCore` run in-process on the same engine (with `MultimodalProcessor` for vision-language engines),
which the server's greedy output must reproduce, and the fixtures of a module serving one tiny VL preset."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from grpc_service.client import NativeClient, Sampling, TritonClient
from grpc_service.launcher import ServerProcess, metric_value
from grpc_service.proto import trtserve_pb2 as pb
from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from runtime.multimodal.image_io import ImageLimits
from runtime.multimodal.processor import MultimodalInputs, MultimodalProcessor
from runtime.sampling_params import SamplingParams

__all__ = ["IMAGE_BLOCK", "VIDEO_BLOCK", "VL_GREEDY", "VL_MAX_IMAGES", "VL_MAX_PIXELS", "VL_MAX_TOKENS",
           "VL_SERVER_ARGS", "Reference", "ServerProcess", "VLReference", "metric_value", "vl_server_fixtures"]

# the vision-language servers of the tests: few tokens, small limits that the bad-image tests run into
VL_MAX_TOKENS = 12
VL_MAX_IMAGES = 3
VL_MAX_PIXELS = 512 * 512
VL_SERVER_ARGS = ("--max-images-per-request", str(VL_MAX_IMAGES), "--max-image-pixels", str(VL_MAX_PIXELS))
VL_GREEDY = Sampling(max_tokens=VL_MAX_TOKENS, temperature=0.0)
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"


class Reference:
    """Greedy generations from EngineCore in this process: what the server must reproduce."""

    def __init__(self, engine_dir: Path) -> None:
        self.core = EngineCore.from_dir(engine_dir)
        self._count = 0

    def encode(self, text: str) -> list[int]:
        return list(self.core.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        rendered = self.core.tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, tokenize=True,
            return_dict=True)
        return list(rendered["input_ids"])

    def greedy(self, prompt_ids: list[int], max_tokens: int, **kw: object) -> tuple[str, list[int]]:
        self._count += 1
        rid = f"ref-{self._count}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)  # type: ignore[arg-type]
        outputs = self.core.generate_all([EngineRequest(rid, prompt_ids, params)])
        return collect_text(outputs[rid])


class VLReference:
    """EngineCore + MultimodalProcessor in this process, with the VL servers' limits: what the server must
    reproduce. Without a prefix cache, so that a server whose cache reuses the wrong K/V cannot agree with
    a reference that made the same mistake."""

    def __init__(self, engine_dir: Path) -> None:
        self.core = EngineCore.from_dir(engine_dir, EngineConfig(enable_prefix_caching=False))
        self.limits = ImageLimits(max_images_per_request=VL_MAX_IMAGES, max_image_pixels=VL_MAX_PIXELS)
        self.processor = MultimodalProcessor(self.core.engine, self.core.tokenizer, self.limits)
        self._count = 0

    def greedy(self, prompt: tuple[list[int], MultimodalInputs | None]) -> tuple[str, list[int]]:
        self._count += 1
        rid = f"vl-ref-{self._count}"
        ids, mm = prompt
        request = EngineRequest(rid, ids, SamplingParams(max_tokens=VL_MAX_TOKENS, temperature=0.0), multimodal=mm)
        return collect_text(self.core.generate_all([request])[rid])

    def chat(self, *parts: dict) -> tuple[list[int], MultimodalInputs]:
        """One user message of runtime content parts ({"type": "text" | "image" | "video", ...})."""
        return self.processor.process_chat([{"role": "user", "content": list(parts)}], True)


def vl_server_fixtures(preset: str) -> tuple[object, object, object, object, object]:
    """The module-scoped fixtures of a test module that serves one tiny vision-language preset with the VL
    limits; bind them under their own names at module level, where pytest looks for them:
    `engine_dir, server, client, triton, reference = vl_server_fixtures("tiny-...")`."""

    @pytest.fixture(scope="module")
    def engine_dir(build_tiny: Callable[..., Path]) -> Path:
        return build_tiny(preset)

    @pytest.fixture(scope="module")
    def server(engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
        process = ServerProcess.start(["--engine", str(engine_dir), *VL_SERVER_ARGS],
                                      tmp_path_factory.mktemp(f"grpc-{preset}-logs"))
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

    return engine_dir, server, client, triton, reference


def wait_idle(client: NativeClient, timeout_s: float = 10.0) -> pb.EngineStatus:
    """Poll ModelInfo until nothing is in flight and no KV block is held (or the timeout passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.model_info().status
        if (status.num_in_flight == 0 and status.kv_used_blocks == 0) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def assert_idle(client: NativeClient) -> None:
    """Nothing in flight, running or waiting, and every KV block free."""
    status = wait_idle(client)
    assert status.num_in_flight == 0 and status.num_running == 0 and status.num_waiting == 0, status
    assert status.kv_used_blocks == 0 and status.kv_free_blocks == status.kv_total_blocks, status
