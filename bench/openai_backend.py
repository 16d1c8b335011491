"""One benchmark request over an OpenAI-compatible HTTP API (trtserve's, vLLM's, trtllm-serve's, ...), timed.

What it is for: `OpenAIBackend`, the third protocol of `trtserve-bench`. A text
request goes to `POST /v1/completions` with the prompt as token ids (the same
ids the native API gets, so no server re-tokenizes differently); a request
with images goes to `POST /v1/chat/completions` with the text and one
`image_url` data URL per image. Both stream (SSE) with
`stream_options.include_usage`, force the output length with vLLM's
`ignore_eos` and `min_tokens` extensions (which trtserve also honours), and
read the counts from the final usage chunk.
Not for: the OpenAI API itself (grpc_service/http) or scheduling (loadgen.py).
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

from bench.backends import BenchRequest, RequestRecord

COUNT_SOURCE = {
    "prompt_tokens": "usage.prompt_tokens of the final stream chunk (stream_options.include_usage)",
    "output_tokens": "usage.completion_tokens of the final stream chunk",
    "cached_tokens": "usage.prompt_tokens_details.cached_tokens of the final stream chunk (0 when absent)",
    "ttft": "client clock: send -> first chunk carrying text",
}
REQUEST_TIMEOUT_S = 600.0


class OpenAIBackend:
    protocol = "openai"

    def __init__(self, base_url: str, model: str, max_connections: int = 256) -> None:
        import httpx2

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.client = httpx2.AsyncClient(timeout=REQUEST_TIMEOUT_S,
                                         limits=httpx2.Limits(max_connections=max_connections))

    async def close(self) -> None:
        await self.client.aclose()

    def body(self, request: BenchRequest) -> tuple[str, dict[str, Any]]:
        common: dict[str, Any] = {"model": self.model, "max_tokens": request.output_len, "temperature": 0.0,
                                  "ignore_eos": True, "min_tokens": request.output_len, "stream": True,
                                  "stream_options": {"include_usage": True}}
        if not request.images:
            return "/v1/completions", {**common, "prompt": list(request.token_ids)}
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}
            for data in request.images]
        parts.append({"type": "text", "text": request.text})
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": parts}]}

    async def send(self, request: BenchRequest) -> RequestRecord:
        path, body = self.body(request)
        record = RequestRecord(time.perf_counter(), prompt_text=request.text, prompt_images=request.images)
        text: list[str] = []
        try:
            async with self.client.stream("POST", self.base_url + path, json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode("utf-8", errors="replace")[:300]
                    record.error = f"HTTP {response.status_code}: {detail}"
                else:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[len("data: "):])
                        if "error" in chunk:
                            record.error = f"error event: {chunk['error'].get('message', chunk['error'])}"
                            break
                        delta = _delta_text(chunk)
                        if delta and record.first_token_s is None:
                            record.first_token_s = time.perf_counter()
                        text.append(delta)
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                            record.prompt_tokens = usage["prompt_tokens"]
                            record.output_tokens = usage["completion_tokens"]
                            record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:            # connection refused / reset, bad JSON: the record says which
            record.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        record.end_s = time.perf_counter()
        record.output_text = "".join(text)
        if record.ok and record.prompt_tokens is None:
            record.error = "no usage chunk (the server ignored stream_options.include_usage)"
        return record


def _delta_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""
