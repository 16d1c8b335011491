"""The HF baseline of trtserve-bench on LLaVA / LLaVA-NeXT / InternVL engines: HF's own processors give each
request exactly the prompt ids and pixels the server builds for it (the runtime's MultimodalProcessor, which
the gRPC family tests tie to the served prompt_tokens). A whole bench run with images and the baseline against
a served tiny-llava-next: tests/grpc_service/test_grpc_llava.py (it reuses that module's server)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.backends import BenchRequest
from bench.baseline import HFBaseline
from engine_format.engine_dir import load_engine
from runtime.core.engine_core import EngineCore
from runtime.multimodal.image_io import ImageLimits
from runtime.multimodal.processor import MultimodalProcessor
from tests.helpers import media


@pytest.mark.parametrize("preset", ["tiny-llava", "tiny-llava-next", "tiny-internvl2.5"])
def test_baseline_prompts_are_the_servers(build_tiny: Callable[..., Path], preset: str) -> None:
    engine_dir = build_tiny(preset)
    baseline = HFBaseline(engine_dir, "cpu")
    assert baseline.images is not None
    engine = load_engine(engine_dir)
    server_side = MultimodalProcessor(engine, EngineCore(engine).tokenizer, ImageLimits())
    wide, tall, square = media.gradient_png(90, 50, 1), media.gradient_png(40, 120, 2), media.gradient_png(64, 64, 3)
    text_ids = tuple(baseline.tokenizer.encode("no image here", add_special_tokens=False))
    requests = [BenchRequest("Describe this picture.", (), 3, (wide,)),
                BenchRequest("Compare them.", (), 2, (tall, square)),
                BenchRequest("no image here", text_ids, 2, ())]
    prompts, vision = baseline.images.batch(requests)
    expected = [server_side.process_text(r.text, list(r.images))[0] if r.images else list(r.token_ids)
                for r in requests]
    assert [list(p) for p in prompts] == expected
    assert len({len(p) for p in prompts}) == 3 and vision.image_token_id is None
    # the same pixels too: HF's image processor and the server's preprocessing (bit-identical by design)
    visuals = [v for r in requests if r.images for v in server_side.process_text(r.text, list(r.images))[1].visuals]
    pixels = vision.tensors["pixel_values"]
    if pixels.dim() == 5:        # LLaVA-NeXT: [images, most crops, 3, S, S], zero-padded
        per_image = [pixels[i, :v.pixel_values.shape[0]] for i, v in enumerate(visuals)]
        assert pixels.shape[0] == len(visuals)
    else:                        # LLaVA-1.5: one [3, S, S] per image; InternVL: every image's tiles in order
        per_image = list(torch.split(pixels, [v.pixel_values.shape[0] for v in visuals]))
    for hf, visual in zip(per_image, visuals, strict=True):
        torch.testing.assert_close(hf, torch.from_numpy(visual.pixel_values), atol=1e-6, rtol=0)
