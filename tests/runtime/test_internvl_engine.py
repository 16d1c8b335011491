"""The tiny InternVL2.5 engine against transformers (greedy tokens, logits) and under in-flight batching.

Reference: `InternVLForConditionalGeneration.generate` (float32) on the prompt transformers' own
`InternVLProcessor` makes (tests/helpers/internvl_helpers.py): our `MultimodalProcessor` must give the same
token ids, the engine the same greedy tokens, and every generated position's logits within ATOL (absolute:
the engine and HF sum in different orders; the tower runs on ONNX Runtime). Cases: one image, two images
of different sizes and aspect ratios, text only, a wide image that takes 12 tiles + the thumbnail, and a
video of three frames (HF's video processor needs torchvision: the frames are single tiles, expanded by
HF's `replace_video_token`). Then requests of different image sizes batched in flight (with chunked
prefill splitting images) give the tokens each gives alone, and prefix caching reuses an image's blocks
by its content only.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_format.engine_dir import load_engine
from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from runtime.multimodal.processor import MultimodalProcessor
from tests.conftest import hf_dir_of, load_hf
from tests.helpers.engine_helpers import assert_all_blocks_free, greedy, recording_logits, run_arrivals, tokens_alone
from tests.helpers.internvl_helpers import hf_internvl_processor, hf_prompt
from tests.helpers.vl_helpers import noise_frames, noise_image, user_turn, vl_processor

ATOL = 1e-4
NEW_TOKENS = 12
BLOCK = 16


@pytest.fixture(scope="module")
def engine(build_tiny):
    return load_engine(build_tiny("tiny-internvl2.5"))


@pytest.fixture(scope="module")
def hf(engine):
    return load_hf(engine.root)


@pytest.fixture(scope="module")
def processor(engine) -> MultimodalProcessor:
    return vl_processor(engine)


@pytest.fixture(scope="module")
def hf_processor(engine):
    return hf_internvl_processor(hf_dir_of(engine.root), engine.vision.config.tokens_per_tile)


CASES = {
    "one_image": lambda: user_turn(noise_image(1, 150, 100), "Describe this image."),
    "two_images_different_sizes": lambda: user_turn("Compare ", noise_image(2, 200, 60), " with ",
                                                    noise_image(3, 50, 170), "."),
    "text_only": lambda: [{"role": "user", "content": "The capital of France is"}],
    "wide_image_many_tiles": lambda: user_turn(noise_image(4, 1000, 60), "Read the banner."),
}


def text_ids(processor: MultimodalProcessor, messages: list[dict]) -> list[int]:
    return list(processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"])


def engine_run(core: EngineCore, ids: list[int], mm, max_tokens: int = NEW_TOKENS) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of every sampled position (recorded from the executor)."""
    with recording_logits(core) as rows:
        out = core.generate_all([EngineRequest("r", ids, greedy(max_tokens), multimodal=mm)])["r"]
    return collect_text(out)[1], torch.stack(rows)


def hf_run(model, prompt, max_tokens: int = NEW_TOKENS) -> tuple[list[int], torch.Tensor]:
    kwargs = {} if prompt.pixel_values is None else {"pixel_values": prompt.pixel_values}
    with torch.inference_mode():
        out = model.generate(prompt.input_ids, attention_mask=torch.ones_like(prompt.input_ids),
                             max_new_tokens=max_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0, **kwargs)
    return out.sequences[0, prompt.input_ids.shape[1]:].tolist(), torch.stack([s[0] for s in out.logits]).float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_and_logits_equal_hf(engine, hf, processor, hf_processor, case: str) -> None:
    messages = CASES[case]()
    reference = hf_prompt(hf_processor, messages)
    if case == "text_only":
        ids, mm = text_ids(processor, messages), None
    else:
        ids, mm = processor.process_chat(messages)
        assert all(v.grid_thw[1:] == (8, 8) for v in mm.visuals)
        assert torch.equal(torch.from_numpy(np.concatenate([v.pixel_values for v in mm.visuals])),
                           reference.pixel_values)
    assert list(ids) == reference.input_ids[0].tolist()          # our expansion = HF's processor
    if case == "wide_image_many_tiles":
        assert mm.visuals[0].grid_thw[0] == 13 and mm.spans[0].length == 13 * 16
    core = EngineCore(engine)
    tokens, logits = engine_run(core, list(ids), mm)
    ref_tokens, ref_logits = hf_run(hf, reference)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_video_frames_equal_hf(engine, hf, processor, hf_processor) -> None:
    frames = noise_frames(5, 3, 90, 60)
    messages = user_turn(frames, "What happens?")
    ids, mm = processor.process_chat(messages)
    assert [v.kind for v in mm.visuals] == ["video"] * 3 and len(mm.spans) == 3
    tiles = np.concatenate([v.pixel_values for v in mm.visuals])
    reference = hf_prompt(hf_processor, messages, video_tiles=tiles)
    assert ids == reference.input_ids[0].tolist()
    tokens, logits = engine_run(EngineCore(engine), ids, mm, 8)
    ref_tokens, ref_logits = hf_run(hf, reference, 8)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", [EngineConfig(), EngineConfig(max_num_tokens=40, max_encoder_patches=256)],
                         ids=["default", "chunked-prefill"])
def test_different_image_sizes_in_flight_equal_alone(engine, processor, config: EngineConfig) -> None:
    shared = noise_image(10, 120, 200)
    specs = [("tall", user_turn(shared, "Describe it."), 8, 0),
             ("text", [{"role": "user", "content": "Count: 1 2 3"}], 9, 0),
             ("wide", user_turn("Banner: ", noise_image(11, 900, 70)), 7, 1),
             ("two", user_turn(noise_image(12, 60, 60), " and ", noise_image(13, 300, 100)), 6, 1),
             ("tall-again", user_turn(shared, "What is it?"), 8, 2),
             ("video", user_turn(noise_frames(14, 2, 70, 50), "Go."), 5, 3)]
    prompts = {key: (processor.process_chat(m) if key != "text" else
                     (text_ids(processor, m), None))
               for key, m, _, _ in specs}
    core = EngineCore(engine, config)
    got = run_arrivals(core, [(at, EngineRequest(key, list(prompts[key][0]), greedy(n), multimodal=prompts[key][1]))
                              for key, _, n, at in specs])
    for key, _, n, _ in specs:
        ids, mm = prompts[key]
        assert got[key] == tokens_alone(engine, EngineRequest(key, list(ids), greedy(n), multimodal=mm)), key
    # the shared image is encoded once (encoder cache or prefix cache), every other visual once
    assert core.stats().encoder.num_encoded_visuals == len({v.content_hash for _, mm in prompts.values() if mm
                                                            for v in mm.visuals}) == 6
    assert_all_blocks_free(core)


def test_validation_report_holds_the_tower_parity(engine) -> None:
    """The build compared ONNX Runtime, our PyTorch tower and transformers' InternVLModel (polygraphy) and the LLM."""
    import json

    report = json.loads((engine.root / "validation.json").read_text())
    vision = report["vision"]
    assert vision["passed"] and set(vision["pairs"]) == {"pytorch_vs_hf", "onnxruntime_vs_pytorch", "onnxruntime_vs_hf"}
    assert all(pair["max_rel_err"] < 1e-4 for pair in vision["pairs"].values())
    assert vision["grids"] == [[[1, 8, 8]], [[5, 8, 8], [1, 8, 8]], [[13, 8, 8]]]
    assert report["passed"]


def test_prefix_cache_reuses_an_image_by_content(engine, processor) -> None:
    image = noise_image(30, 200, 120)
    ids_a, mm_a = processor.process_chat(user_turn(image, "Describe this picture in detail."))
    ids_b, mm_b = processor.process_chat(user_turn(image, "What colour dominates?"))
    ids_c, mm_c = processor.process_chat(user_turn(noise_image(31, 200, 120), "Describe this picture in detail."))
    assert ids_c == ids_a and mm_c.spans[0].content_hash != mm_a.spans[0].content_hash
    span = mm_a.spans[0]
    core = EngineCore(engine)
    core.generate_all([EngineRequest("a", ids_a, greedy(4), multimodal=mm_a)])
    out_b = core.generate_all([EngineRequest("b", ids_b, greedy(4), multimodal=mm_b)])["b"]
    common = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
    assert common > span.offset + span.length
    assert out_b[-1].usage.cached_tokens == common // BLOCK * BLOCK
    out_c = core.generate_all([EngineRequest("c", ids_c, greedy(4), multimodal=mm_c)])["c"]
    assert out_c[-1].usage.cached_tokens == span.offset // BLOCK * BLOCK
    assert core.stats().encoder.num_encoded_visuals == 2          # image a once (b hit the prefix cache), c
    assert_all_blocks_free(core)
