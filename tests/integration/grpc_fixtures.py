"""Helpers for the gRPC tests: the server launcher (shared with the demo) and reference generations from
`EngineCore` run in-process on the same engine, which the server's greedy output must reproduce."""
from __future__ import annotations

import time
from pathlib import Path

from grpc_service.client import NativeClient
from grpc_service.launcher import ServerProcess, metric_value
from grpc_service.proto import trtserve_pb2 as pb
from runtime.engine_core import EngineCore, EngineRequest, collect_text
from runtime.sampling_params import SamplingParams

__all__ = ["Reference", "ServerProcess", "metric_value"]


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


def wait_idle(client: NativeClient, timeout_s: float = 10.0) -> pb.EngineStatus:
    """Poll ModelInfo until nothing is in flight and no KV block is held (or the timeout passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.model_info().status
        if (status.num_in_flight == 0 and status.kv_used_blocks == 0) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)
