"""Helpers for the OpenAI-compatible HTTP tests: a client for a test server, and a check that a response
parsed by the `openai` package's models carries no field those published types do not define."""
from __future__ import annotations

from typing import Any

import openai
from pydantic import BaseModel

from tests.helpers.grpc_fixtures import ServerProcess


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
