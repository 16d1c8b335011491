"""Helpers for the OpenAI-compatible HTTP tests: a client for a test server, a check that a response
parsed by the `openai` package's models carries no field those published types do not define, and the
image-URL case every vision-language family's server test runs."""
from __future__ import annotations

import base64
from typing import Any

import openai
from pydantic import BaseModel

from tests.helpers.grpc_fixtures import VL_GREEDY, ServerProcess, VLReference


def openai_client(server: ServerProcess, timeout_s: float = 120.0) -> openai.OpenAI:
    """No retries: a 429 or 503 must reach the test as it was sent."""
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=timeout_s)


def assert_no_extra_fields(value: Any, path: str = "response") -> None:
    """Every pydantic model inside `value` was filled from declared fields only."""
    if isinstance(value, BaseModel):
        extra = value.model_extra or {}
        assert not extra, f"{path}: fields outside OpenAI's type {type(value).__name__}: {sorted(extra)}"
        for name in type(value).model_fields:
            assert_no_extra_fields(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            assert_no_extra_fields(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_no_extra_fields(item, f"{path}[{key!r}]")


def assert_image_url_matches_the_runtime(server: ServerProcess, model: str, reference: VLReference,
                                         png: bytes) -> None:
    """One image (a PNG data URL) + "Describe." through the OpenAI API: the runtime's greedy text and token
    counts, and no field outside OpenAI's types."""
    prompt = reference.chat({"type": "image", "image": png}, {"type": "text", "text": "Describe."})
    expected = reference.greedy(prompt)
    response = openai_client(server).chat.completions.create(
        model=model, max_tokens=VL_GREEDY.max_tokens, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
            {"type": "text", "text": "Describe."}]}])
    assert_no_extra_fields(response)
    assert response.choices[0].message.content == expected[0]
    assert (response.usage.completion_tokens, response.usage.prompt_tokens) == (len(expected[1]), len(prompt[0]))
