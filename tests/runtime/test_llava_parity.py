"""LLaVA-1.5 and LLaVA-NeXT engines against HF transformers `generate` (float32), and in-flight batching.

HF gets what its own processor gives: `LlavaProcessor` / `LlavaNextProcessor` over HF's PIL image
processor of the checkpoint and our tokenizer's chat template (it expands each `<image>` itself); our
`MultimodalProcessor` must produce the same ids. Greedy tokens must be identical; the logits of every
generated position agree within ATOL (absolute, fp32: the engine and HF sum in different orders and the
tower runs on ONNX Runtime). LLaVA-1.5 is checked fully (one image, two images of different sizes and
aspect ratios, text only); NeXT on what differs (images whose anyres grids differ and unpad, with
image_newline rows: two images of different grids, one of them unpadded) plus in-flight batching of
requests whose images take different crop counts, and the prefix / encoder caches keyed by image content.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine_format.engine_dir import LoadedEngine, load_engine
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from runtime.multimodal.image_io import ImageLimits
from runtime.multimodal.processor import MultimodalProcessor
from tests.conftest import hf_dir_of, load_hf
from tests.helpers.engine_helpers import greedy, recording_logits
from tests.helpers.vl_helpers import noise_image

ATOL = 1e-4
NEW_TOKENS = 8
IMAGES = {  # (width, height)
    "wide": noise_image(1, 90, 50),        # NeXT: 2x2 grid, feature rows unpadded 4 -> 2
    "tall": noise_image(2, 40, 120),       # NeXT: 3x1 grid
    "small_square": noise_image(3, 40, 40),
    "thin": noise_image(4, 70, 33),        # NeXT: 1x3 grid, columns unpadded 6 -> 4
    "half": noise_image(5, 56, 28),        # NeXT: 1x2 grid
}


def _messages(*parts: object) -> list[dict]:
    content = [{"type": "image", "image": IMAGES[p]} if p in IMAGES else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


CASES = {
    "one_image": _messages("wide", "Describe this image."),
    "two_images_different_sizes": _messages("Compare", "tall", "with", "thin", "."),
    "text_only": [{"role": "user", "content": "The capital of France is"}],
}


def _hf_processor(engine: LoadedEngine, tokenizer):
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    next_ = engine.vision.config.model_type == "llava_next"
    image_class, processor_class = ((LlavaNextImageProcessorPil, LlavaNextProcessor) if next_
                                    else (CLIPImageProcessorPil, LlavaProcessor))
    images = image_class.from_pretrained(str(hf_dir_of(engine.root)))
    # llava-hf's processor_config.json: num_additional_image_tokens 1 (the CLS), strategy 'default' removes it
    return processor_class(image_processor=images, tokenizer=tokenizer, patch_size=engine.vision.config.patch_size,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-llava-next"])
def llava(request, build_tiny: Callable[..., Path]):
    engine = load_engine(build_tiny(request.param))
    core = EngineCore(engine)
    return engine, core, load_hf(engine.root), _hf_processor(engine, core.tokenizer)


def _hf_run(hf, processor, messages: list[dict]) -> tuple[list[int], list[int], torch.Tensor]:
    """(prompt ids, greedy tokens, logits of every generated position) from HF's processor and generate."""
    images = [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
              if p["type"] == "image"]
    stripped = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                 [{"type": p["type"], "text": p.get("text", "")} for p in m["content"]]} for m in messages]
    text = processor.tokenizer.apply_chat_template(stripped, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=images or None, text=text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=processor.tokenizer.pad_token_id)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out.sequences[0, len(prompt):].tolist(), torch.stack([s[0] for s in out.logits]).float()


def _engine_run(core: EngineCore, requests: dict[str, tuple[list[int], object]]
                ) -> dict[str, tuple[list[int], torch.Tensor]]:
    """Greedy tokens of the requests run together (in-flight), and the logits rows when one request runs."""
    with recording_logits(core) as rows:
        outs = core.generate_all([EngineRequest(rid, ids, greedy(NEW_TOKENS), multimodal=mm)
                                  for rid, (ids, mm) in requests.items()])
    return {rid: (collect_text(out)[1], torch.stack(rows) if len(requests) == 1 else torch.empty(0))
            for rid, out in outs.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_and_logits_equal_hf(llava, case: str) -> None:
    engine, core, hf, processor = llava
    if engine.vision.config.model_type == "llava_next" and case != "two_images_different_sizes":
        pytest.skip("NeXT differs in its images only: checked on two that take different grids, one unpadded")
    messages = CASES[case]
    prompt, ref_tokens, ref_logits = _hf_run(hf, processor, messages)
    if case == "text_only":
        ids, mm = prompt, None
    else:
        ids, mm = MultimodalProcessor(engine, core.tokenizer, ImageLimits()).process_chat(messages)
        assert ids == prompt          # our <image> expansion = HF's processor's
    tokens, logits = _engine_run(core, {"r": (ids, mm)})["r"]
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_in_flight_batch_of_different_image_sizes_equals_each_alone(llava) -> None:
    engine, core, _, _ = llava
    if engine.vision.config.model_type != "llava_next":
        pytest.skip("one geometry per image on LLaVA-1.5; NeXT's crop counts differ per image")
    processor = MultimodalProcessor(engine, core.tokenizer, ImageLimits())
    requests = {name: processor.process_chat(_messages(name, f"What is in the {name} picture?"))
                for name in ("wide", "tall", "half", "thin")}
    assert len({len(mm.visuals[0].pixel_values) for _, mm in requests.values()}) == 3     # 5, 4 and 3 crops
    together = _engine_run(core, requests)
    for name, request in requests.items():
        assert together[name][0] == _engine_run(core, {name: request})[name][0], name


def test_prefix_and_encoder_caches_are_keyed_by_image_content(llava) -> None:
    """The same image again reuses the KV blocks over it and its cached embeddings; another image of the
    same size (same token ids) reuses only the blocks before it, and answers as it would alone."""
    engine, core, _, _ = llava
    if engine.vision.config.model_type != "llava_next":
        pytest.skip("the caches are family-independent; checked once, on NeXT's size-dependent rows")
    processor = MultimodalProcessor(engine, core.tokenizer, ImageLimits())
    block = engine.build.tokens_per_block
    first, second = noise_image(7, 40, 40), noise_image(8, 40, 40)
    ids_a, mm_a = processor.process_chat([{"role": "user", "content": [
        {"type": "text", "text": "Look:"}, {"type": "image", "image": first},
        {"type": "text", "text": "Describe this picture in detail."}]}])
    ids_b, mm_b = processor.process_chat([{"role": "user", "content": [
        {"type": "text", "text": "Look:"}, {"type": "image", "image": first}, {"type": "text", "text": "Colour?"}]}])
    ids_c, mm_c = processor.process_chat([{"role": "user", "content": [
        {"type": "text", "text": "Look:"}, {"type": "image", "image": second},
        {"type": "text", "text": "Describe this picture in detail."}]}])
    span = mm_a.spans[0]
    assert ids_c == ids_a and mm_c.spans[0].content_hash != span.content_hash and span.length >= block
    params = greedy(4)
    out_a = core.generate_all([EngineRequest("cache-a", ids_a, params, multimodal=mm_a)])["cache-a"]
    encoded = core.stats().encoder.num_encoded_visuals
    out_b = core.generate_all([EngineRequest("cache-b", ids_b, params, multimodal=mm_b)])["cache-b"]
    common = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
    assert common >= span.offset + span.length
    assert out_b[-1].usage.cached_tokens == common // block * block
    assert core.stats().encoder.num_encoded_visuals == encoded          # nothing encoded again
    out_c = core.generate_all([EngineRequest("cache-c", ids_c, params, multimodal=mm_c)])["cache-c"]
    assert out_c[-1].usage.cached_tokens == span.offset // block * block
    alone = EngineCore(engine)
    for rid, ids, mm, out in (("a", ids_a, mm_a, out_a), ("c", ids_c, mm_c, out_c)):
        expected = alone.generate_all([EngineRequest(rid, ids, params, multimodal=mm)])[rid]
        assert collect_text(out)[1] == collect_text(expected)[1], rid


def test_onnx_groups_and_pytorch_tower_agree(llava) -> None:
    """ONNX Runtime split into groups of whole images (as the engine does under a small patch budget) equals
    one call, and the PyTorch backend, within 1e-5 (the validation tolerance; float32)."""
    import numpy as np

    from runtime.vision.vision_encoder import OnnxVisionEncoder, TorchVisionEncoder

    engine, core, _, _ = llava
    if engine.vision.config.model_type != "llava_next":
        pytest.skip("the encoders are family-independent; checked on NeXT's variable crop counts")
    processor = MultimodalProcessor(engine, core.tokenizer, ImageLimits())
    visuals = [processor.process_chat(_messages(name, "?"))[1].visuals[0] for name in ("wide", "tall", "half")]
    pixels = torch.from_numpy(np.concatenate([v.pixel_values for v in visuals]))
    grids = [v.grid_thw for v in visuals]
    cfg, per_image = engine.vision.config, max(g[0] * g[1] * g[2] for g in grids)
    whole = OnnxVisionEncoder(str(engine.vision.onnx_path), cfg).encode(pixels, grids)
    grouped = OnnxVisionEncoder(str(engine.vision.onnx_path), cfg, max_patches_per_call=per_image).encode(pixels, grids)
    ours = TorchVisionEncoder(cfg, engine.vision.load_weights(), torch.device("cpu"), torch.float32).encode(pixels, grids)
    assert whole.shape == (sum(v.num_tokens for v in visuals), cfg.out_hidden_size)
    torch.testing.assert_close(grouped, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, whole, atol=1e-5, rtol=0)


def test_build_validated_the_tower_with_polygraphy(llava) -> None:
    """validation.json: ONNX Runtime, our PyTorch tower and transformers' (LlavaModel / LlavaNextModel
    get_image_features) agree on several images per call; NeXT's feeds take every crop count."""
    import json

    engine = llava[0]
    report = json.loads((engine.root / "validation.json").read_text())
    vision = report["vision"]
    assert report["passed"] and vision["passed"]
    assert sorted(vision["pairs"]) == ["onnxruntime_vs_hf", "onnxruntime_vs_pytorch", "pytorch_vs_hf"]
    assert all(pair["passed"] and pair["max_rel_err"] <= 1e-5 for pair in vision["pairs"].values())
    assert max(len(grids) for grids in vision["grids"]) >= 3
    if engine.vision.config.model_type == "llava_next":
        assert {grid[0] for grids in vision["grids"] for grid in grids} == {3, 4, 5}
