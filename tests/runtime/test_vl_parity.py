"""Qwen2-VL / Qwen2.5-VL engines against HF transformers `generate` (float32).

Greedy tokens must be identical; the logits of every generated position must agree within
ATOL (absolute, fp32: the engine and HF sum in different orders, and the vision tower runs on
ONNX Runtime or PyTorch). HF gets what its own processor would give: HF's image processor,
our tokenizer's chat template with the pads expanded, and `mm_token_type_ids`.
"""
from __future__ import annotations

import pytest
import torch

from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from engine_format.engine_dir import load_engine
from runtime.multimodal.image_io import ImageLimits
from runtime.multimodal.processor import MultimodalProcessor
from tests.conftest import load_hf
from tests.helpers.engine_helpers import greedy, recording_logits
from tests.helpers.vl_helpers import (
    VL_PRESETS,
    hf_generate,
    hf_inputs,
    noise_frames,
    noise_image,
)

ATOL = 1e-4
NEW_TOKENS = 24


def _messages(case: str) -> list[dict]:
    user = {
        "one_image": [{"type": "image", "image": noise_image(1, 90, 60)},
                      {"type": "text", "text": "Describe this image."}],
        "two_images_different_sizes": [
            {"type": "text", "text": "Compare "}, {"type": "image", "image": noise_image(2, 56, 112)},
            {"type": "text", "text": " with "}, {"type": "image", "image": noise_image(3, 150, 84)},
            {"type": "text", "text": "."}],
        "video": [{"type": "video", "video": noise_frames(4, 4, 84, 56), "fps": 1.0},
                  {"type": "text", "text": "What happens?"}],
        "video_fps3_and_image": [
            {"type": "image", "image": noise_image(5, 60, 60)},
            {"type": "video", "video": noise_frames(6, 6, 56, 84), "fps": 3.0},
            {"type": "text", "text": "Where is the image in the video?"}],
        "text_only": "The capital of France is",
    }[case]
    return [{"role": "user", "content": user}]


CASES = ["one_image", "two_images_different_sizes", "video", "video_fps3_and_image", "text_only"]


@pytest.fixture(scope="module", params=VL_PRESETS)
def vl(request, build_tiny):
    engine = load_engine(build_tiny(request.param))
    return engine, load_hf(engine.root)


def _engine_run(core: EngineCore, ids: list[int], mm, max_tokens: int = NEW_TOKENS
                ) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens, and the logits of every sampled position (recorded from the executor)."""
    with recording_logits(core) as rows:
        out = core.generate_all([EngineRequest("r", ids, greedy(max_tokens), multimodal=mm)])["r"]
    return collect_text(out)[1], torch.stack(rows)


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_and_logits_equal_hf(vl, case: str) -> None:
    engine, hf = vl
    core = EngineCore(engine)
    messages = _messages(case)
    reference = hf_inputs(engine, core.tokenizer, messages)
    if case == "text_only":
        ids, mm = reference.input_ids[0].tolist(), None
    else:
        ids, mm = MultimodalProcessor(engine, core.tokenizer, ImageLimits()).process_chat(messages)
        assert ids == reference.input_ids[0].tolist()     # our expansion = HF's string-level expansion
    ref_tokens, ref_logits = hf_generate(hf, reference, NEW_TOKENS, engine.pad_token_id)
    tokens, logits = _engine_run(core, ids, mm)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    if mm is not None:
        assert core.stats().encoder.num_encoded_visuals == len(mm.visuals)


def test_pytorch_vision_backend_matches_hf(vl) -> None:
    """The default on CPU is ONNX Runtime (the test above); the PyTorch tower must agree as well."""
    engine, hf = vl
    core = EngineCore(engine, EngineConfig(vision_backend="pytorch"))
    messages = _messages("two_images_different_sizes")
    reference = hf_inputs(engine, core.tokenizer, messages)
    ids, mm = MultimodalProcessor(engine, core.tokenizer, ImageLimits()).process_chat(messages)
    ref_tokens, ref_logits = hf_generate(hf, reference, 8, engine.pad_token_id)
    tokens, logits = _engine_run(core, ids, mm, 8)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
