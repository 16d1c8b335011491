"""Engine request records for the scheduler and KV-cache tests, which need tokens and spans but no model."""
from __future__ import annotations

import numpy as np

from runtime.core.request import MultimodalSpan, Request
from runtime.multimodal.processor import MultimodalInputs
from runtime.sampling_params import SamplingParams


def make_request(request_id: str, prompt: list[int], max_tokens: int = 4, *, salt: str | None = None,
                 mm_spans: tuple[MultimodalSpan, ...] = ()) -> Request:
    """A request whose prompt holds placeholder spans (content hashes only: no visuals, no M-RoPE rows)."""
    multimodal = (MultimodalInputs((), mm_spans, np.zeros((3, 0), dtype=np.int64), 0) if mm_spans else None)
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens), cache_salt=salt,
                   multimodal=multimodal)
