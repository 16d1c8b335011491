"""VL engines under in-flight batching: multimodal requests give the tokens they give alone.

Covers mixing with text requests, chunked prefill that splits an image, preemption
(recompute, with and without the encoder cache), prefix reuse of a repeated image and
none for a different image, encoder-cache hits and batching, and admission checks.
Parity of a request alone with HF is in test_vl_parity.py.
"""
from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
import pytest
import torch

from runtime.config import EngineConfig
from runtime.vision.encoder_cache import EncoderCache
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from engine_format.engine_dir import load_engine
from runtime.errors import FieldError
from runtime.multimodal.image_io import ImageLimits
from runtime.families.qwen2_vl import IMAGE_PAD, VISION_END, VISION_START
from runtime.multimodal.processor import MultimodalProcessor
from runtime.sampling_params import SamplingParams
from tests.helpers.engine_helpers import assert_all_blocks_free, greedy, run_arrivals, tokens_alone
from tests.helpers.vl_helpers import VL_PRESETS, noise_frames, noise_image, user_turn, vl_processor

BLOCK = 16


@pytest.fixture(scope="module", params=VL_PRESETS)
def engine(request, build_tiny):
    return load_engine(build_tiny(request.param))


@pytest.fixture(scope="module")
def processor(engine):
    return vl_processor(engine)


@pytest.fixture(scope="module")
def alone(engine):
    """Tokens of one request run alone on a fresh engine without prefix caching."""
    cache: dict[tuple, list[int]] = {}

    def run(key: str, ids: list[int], mm, max_tokens: int) -> list[int]:
        content = (tuple(ids), tuple(v.content_hash for v in mm.visuals) if mm else (), max_tokens)
        if content not in cache:
            cache[content] = tokens_alone(engine, EngineRequest(key, ids, greedy(max_tokens), multimodal=mm))
        return cache[content]

    return run


def chat(processor, *parts) -> tuple[list[int], object]:
    return processor.process_chat(user_turn(*parts))


def request_mix(processor, tokenizer):
    """(key, ids, multimodal or None, max_tokens, arrival step): images of several sizes, a repeated
    image, a video, and text-only requests."""
    shared = noise_image(10, 84, 140)
    specs = [
        ("img-a", chat(processor, shared, "Describe it."), 10, 0),
        ("text-a", (tokenizer("def add(a, b):")["input_ids"], None), 12, 0),
        ("img-b", chat(processor, "Left ", noise_image(11, 200, 60), " right ", noise_image(12, 60, 60)), 8, 1),
        ("img-a-again", chat(processor, shared, "What is it?"), 9, 2),
        ("video", chat(processor, noise_frames(13, 4, 56, 84), "Summarise."), 7, 2),
        ("text-b", (tokenizer("Numbers: 1 2 3")["input_ids"], None), 11, 3),
        ("img-c", chat(processor, noise_image(14, 112, 112), "Tell me."), 6, 5),
    ]
    return [(key, ids, mm, n, at) for key, (ids, mm), n, at in specs]


def run_with_arrivals(core: EngineCore, requests) -> dict[str, list[int]]:
    """requests: (key, prompt ids, multimodal or None, max_tokens, arrival step)."""
    return run_arrivals(core, [(at, EngineRequest(key, ids, greedy(n), multimodal=mm))
                               for key, ids, mm, n, at in requests])


@pytest.mark.parametrize("config", [
    EngineConfig(),
    EngineConfig(max_num_tokens=16),                     # chunked prefill: images split across steps
    EngineConfig(max_num_tokens=7, max_batch_size=3),    # budget below the block size
    EngineConfig(max_num_tokens=24, encoder_cache_tokens=0, max_encoder_patches=64),  # no sharing across requests
], ids=["default", "budget16", "budget7-batch3", "budget24-no-encoder-cache"])
def test_multimodal_and_text_in_flight_equal_alone(engine, processor, alone, config: EngineConfig) -> None:
    core = EngineCore(engine, config)
    requests = request_mix(processor, core.tokenizer)
    got = run_with_arrivals(core, requests)
    for key, ids, mm, max_tokens, _ in requests:
        assert got[key] == alone(key, ids, mm, max_tokens), key
    assert_all_blocks_free(core)
    stats = core.stats()
    if config.max_num_tokens == 16:
        assert stats.encoder.num_hits > 0         # later chunks of a split image reuse its embeddings
    if config.encoder_cache_tokens == 0:
        assert stats.encoder.num_hits == 0 and stats.encoder.num_tokens == 0


@pytest.mark.parametrize("prefix_caching,encoder_cache_tokens", [(True, 16384), (False, 16384), (False, 0)])
def test_preemption_in_a_tiny_pool_recomputes_the_same_tokens(engine, processor, alone, prefix_caching: bool,
                                                               encoder_cache_tokens: int) -> None:
    images = [noise_image(100 + i, 112 + 28 * i, 84) for i in range(4)]
    requests = [(f"p{i}", *chat(processor, image, f"Request {i}."), 40, 0) for i, image in enumerate(images)]
    core = EngineCore(engine, EngineConfig(num_kv_blocks=10, enable_prefix_caching=prefix_caching,
                                           encoder_cache_tokens=encoder_cache_tokens))
    got = run_with_arrivals(core, requests)
    assert core.stats().num_preemptions > 0
    for key, ids, mm, max_tokens, _ in requests:
        assert got[key] == alone(key, ids, mm, max_tokens), key
    assert_all_blocks_free(core)
    enc = core.stats().encoder
    if not prefix_caching:   # recomputing a preempted prompt needs its image again: cached, or encoded anew
        assert enc.num_hits > 0 if encoder_cache_tokens else enc.num_encoded_visuals > len(images)


def test_chunked_prefill_splits_an_image_and_encodes_it_once(engine, processor, alone) -> None:
    ids, mm = chat(processor, "Look: ", noise_image(20, 224, 196), "Now answer.")
    span = mm.spans[0]
    assert span.length > 3 * 16          # the image needs several 16-token steps
    core = EngineCore(engine, EngineConfig(max_num_tokens=16))
    out = core.generate_all([EngineRequest("r", ids, greedy(8), multimodal=mm)])["r"]
    assert collect_text(out)[1] == alone("split", ids, mm, 8)
    enc = core.stats().encoder
    assert (enc.num_encoder_calls, enc.num_encoded_visuals) == (1, 1)
    first, last = span.offset // 16, (span.offset + span.length - 1) // 16
    assert enc.num_hits == last - first          # every further step that overlaps the image hits


@pytest.mark.parametrize("encoder_cache_tokens", [0, 16])
def test_chunked_prefill_encodes_an_image_larger_than_the_cache_once(engine, processor, alone,
                                                                     encoder_cache_tokens: int) -> None:
    ids, mm = chat(processor, "Look: ", noise_image(21, 224, 196), "Now answer.")
    span = mm.spans[0]
    assert span.length > max(3 * 16, encoder_cache_tokens)   # several 16-token steps; not kept by the LRU
    core = EngineCore(engine, EngineConfig(max_num_tokens=16, encoder_cache_tokens=encoder_cache_tokens))
    out = core.generate_all([EngineRequest("r", ids, greedy(8), multimodal=mm)])["r"]
    assert collect_text(out)[1] == alone("split-uncached", ids, mm, 8)
    enc = core.stats().encoder
    assert (enc.num_encoder_calls, enc.num_encoded_visuals, enc.num_entries) == (1, 1, 0)
    assert core.executor.vision.num_held == 0      # released once the prefill passed the image


def test_held_embeddings_are_released_when_a_request_is_aborted(engine, processor) -> None:
    ids, mm = chat(processor, "Look: ", noise_image(22, 224, 196), "Now answer.")
    core = EngineCore(engine, EngineConfig(max_num_tokens=16, encoder_cache_tokens=0))
    core.add_request(EngineRequest("r", ids, greedy(8), multimodal=mm))
    for _ in range(mm.spans[0].offset // 16 + 1):  # up to the first 16-token chunk that reaches the image
        core.step()
    assert core.executor.vision.num_held == 1      # the image, held for the rest of the prefill
    core.abort("r")
    core.add_request(EngineRequest("t", ids[:5], greedy(1)))
    core.step()                                    # the next schedule reports the abort
    assert core.executor.vision.num_held == 0


def test_repeated_image_reuses_prefix_blocks_and_a_different_image_does_not(engine, processor, alone) -> None:
    image = noise_image(30, 140, 84)
    ids_a, mm_a = chat(processor, image, "Describe this picture in detail.")
    ids_b, mm_b = chat(processor, image, "What colour dominates?")
    ids_c, mm_c = chat(processor, noise_image(31, 140, 84), "Describe this picture in detail.")
    assert ids_c == ids_a and mm_c.spans[0].content_hash != mm_a.spans[0].content_hash
    span = mm_a.spans[0]
    core = EngineCore(engine)
    out_a = core.generate_all([EngineRequest("a", ids_a, greedy(6), multimodal=mm_a)])["a"]
    hits_before = core.stats().kv.num_hit_tokens
    out_b = core.generate_all([EngineRequest("b", ids_b, greedy(6), multimodal=mm_b)])["b"]
    common = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
    assert common > span.offset + span.length                          # the prompts share the whole image
    assert out_b[-1].usage.cached_tokens == common // BLOCK * BLOCK     # ... and reuse every full block of it
    assert core.stats().kv.num_hit_tokens - hits_before == common // BLOCK * BLOCK
    out_c = core.generate_all([EngineRequest("c", ids_c, greedy(6), multimodal=mm_c)])["c"]
    assert out_c[-1].usage.cached_tokens == span.offset // BLOCK * BLOCK   # only the blocks before the image
    for key, ids, mm, out in (("a", ids_a, mm_a, out_a), ("b", ids_b, mm_b, out_b), ("c", ids_c, mm_c, out_c)):
        assert collect_text(out)[1] == alone(f"reuse-{key}", ids, mm, 6), key
    assert_all_blocks_free(core)


def test_encoder_batches_across_requests_within_the_patch_budget(engine, processor) -> None:
    shared = noise_image(40, 112, 84)
    first = chat(processor, shared, "One.")
    second = chat(processor, shared, "Two, with another ", noise_image(41, 84, 112))
    third = chat(processor, noise_image(42, 56, 56), "Three.")
    requests = [EngineRequest(k, ids, greedy(3), multimodal=mm)
                for k, (ids, mm) in zip("abc", (first, second, third))]
    core = EngineCore(engine, EngineConfig(enable_prefix_caching=False))
    core.generate_all(requests)
    enc = core.stats().encoder
    # three distinct visuals, one encoder call: the shared image is looked up once per step
    assert (enc.num_encoder_calls, enc.num_encoded_visuals) == (1, 3)
    patches = [int(v.pixel_values.shape[0]) for v in (first[1].visuals + second[1].visuals)]
    small = EngineCore(engine, EngineConfig(enable_prefix_caching=False, max_encoder_patches=max(patches)))
    small.generate_all([dataclasses.replace(r) for r in requests])
    enc = small.stats().encoder
    assert enc.num_encoded_visuals == 3 and enc.num_encoder_calls >= 2


def test_encoder_cache_is_lru_and_bounded_in_tokens() -> None:
    cache = EncoderCache(max_tokens=10)
    rows = {name: torch.full((n, 2), float(i)) for i, (name, n) in enumerate([("a", 4), ("b", 4), ("c", 4)])}
    cache.put("a", rows["a"])
    cache.put("b", rows["b"])
    assert cache.get("a") is rows["a"]          # a is now the most recent
    cache.put("c", rows["c"])                   # 12 > 10 tokens: evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache and cache.num_tokens == 8
    cache.put("big", torch.zeros(11, 2))        # larger than the whole cache: not kept, nothing evicted
    assert "big" not in cache and cache.num_entries == 2
    assert cache.get("b") is None
    assert (cache.num_hits, cache.num_misses) == (1, 1)


# ------------------------------------------------------------------ admission and processing


def test_multimodal_request_on_text_engine_is_rejected(build_tiny, processor) -> None:
    core = EngineCore(load_engine(build_tiny("tiny-qwen2")))
    ids, mm = chat(processor, noise_image(50, 56, 56), "Hi")
    with pytest.raises(FieldError, match="no vision encoder") as info:
        core.add_request(EngineRequest("x", ids, greedy(2), multimodal=mm))
    assert info.value.field == "multimodal" and not core.has_unfinished()


def _spans_shifted(mm):
    span = mm.spans[0]
    return dataclasses.replace(mm, spans=(dataclasses.replace(span, offset=span.offset + 1),) + mm.spans[1:])


@pytest.mark.parametrize("corrupt,field", [
    (lambda ids, mm: (ids, None), "prompt_token_ids"),                       # placeholders without images
    (lambda ids, mm: (ids, _spans_shifted(mm)), "multimodal.spans[0]"),
    (lambda ids, mm: (ids[:mm.spans[0].offset + 3], mm), "multimodal.spans[0]"),   # span past the prompt
    (lambda ids, mm: (ids, dataclasses.replace(mm, spans=())), "multimodal.spans"),
    (lambda ids, mm: (ids, dataclasses.replace(mm, mrope_positions=mm.mrope_positions[:, :-1])),
     "multimodal.mrope_positions"),
    (lambda ids, mm: (ids, dataclasses.replace(mm, mrope_delta=mm.mrope_delta + 1)), "multimodal.mrope_positions"),
    (lambda ids, mm: (ids + [ids[mm.spans[0].offset]], mm), "prompt_token_ids"),  # a stray placeholder
])
def test_inconsistent_multimodal_inputs_are_rejected(engine, processor, corrupt, field: str) -> None:
    ids, mm = chat(processor, noise_image(51, 84, 56), "Hi")
    bad_ids, bad_mm = corrupt(ids, mm)
    core = EngineCore(engine)
    with pytest.raises(FieldError) as info:
        core.add_request(EngineRequest("x", bad_ids, greedy(2), multimodal=bad_mm))
    assert info.value.field == field, str(info.value)
    assert not core.has_unfinished()
    assert_all_blocks_free(core)


def test_process_text_puts_blocks_first_or_uses_the_given_ones(processor) -> None:
    image = noise_image(60, 84, 84)
    implicit_ids, implicit = processor.process_text("Caption:", [image])
    explicit_ids, explicit = processor.process_text(f"{VISION_START}{IMAGE_PAD}{VISION_END}Caption:", [image])
    assert implicit_ids == explicit_ids
    np.testing.assert_array_equal(implicit.mrope_positions, explicit.mrope_positions)
    span = implicit.spans[0]
    assert span.offset == 1 and span.length == implicit.visuals[0].num_tokens
    assert set(implicit_ids[span.offset:span.offset + span.length]) == {processor.family.config.image_token_id}
    # visuals follow the placeholders' text order, whatever the argument order
    ids, mm = processor.process_text(f"a{VISION_START}<|video_pad|>{VISION_END}b{VISION_START}{IMAGE_PAD}"
                                     f"{VISION_END}c", [image], [(noise_frames(61, 2, 56, 56), 1.0)])
    assert [v.kind for v in mm.visuals] == ["video", "image"]
    spec = processor.family.config
    assert [ids[s.offset] for s in mm.spans] == [spec.video_token_id, spec.image_token_id]
    assert mm.spans[0].offset + mm.spans[0].length < mm.spans[1].offset


@pytest.mark.parametrize("call,field", [
    (lambda p, img: p.process_text(f"{IMAGE_PAD}{IMAGE_PAD}", [img]), "text"),
    (lambda p, img: p.process_text(f"{VISION_START}{IMAGE_PAD}{VISION_END}", [img, img]), "text"),
    (lambda p, img: p.process_text("hi", []), "images"),
    (lambda p, img: p.process_text("hi", [b"not an image"]), "images[0]"),
    (lambda p, img: p.process_chat([{"role": "user", "content": [{"type": "text", "text": IMAGE_PAD}]}]),
     "messages[0].content[0].text"),
    (lambda p, img: p.process_chat([{"role": "user", "content": [{"type": "audio"}]}]),
     "messages[0].content[0].type"),
    (lambda p, img: p.process_chat([{"role": "user", "content": [{"type": "image", "image": 3}]}]),
     "messages[0].content[0].image"),
    (lambda p, img: p.process_chat([{"role": "user", "content": [{"type": "video", "video": "x"}]}]),
     "messages[0].content[0].video"),
    (lambda p, img: p.process_chat([]), "messages"),
])
def test_processor_errors_name_the_field(processor, call, field: str) -> None:
    with pytest.raises(FieldError) as info:
        call(processor, noise_image(70, 56, 56))
    assert info.value.field == field, str(info.value)


def test_image_limits_apply(engine, processor) -> None:
    limited = MultimodalProcessor(engine, processor.tokenizer, ImageLimits(max_images_per_request=2))
    images = [noise_image(80 + i, 56, 56) for i in range(3)]
    with pytest.raises(FieldError, match="limit is 2"):
        limited.process_text("three", images)
    content = [{"type": "image", "image": img} for img in images]
    with pytest.raises(FieldError, match="limit is 2") as info:
        limited.process_chat([{"role": "user", "content": content}])
    assert info.value.field == "messages[0].content[2].image"


def test_seeded_sampling_with_images_is_batch_independent(engine, processor) -> None:
    ids, mm = chat(processor, noise_image(90, 112, 56), "Story:")
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, seed=7, ignore_eos=True)
    alone_out = EngineCore(engine).generate_all([EngineRequest("t", ids, params, multimodal=mm)])["t"]
    rng = random.Random(3)
    others = [EngineRequest(f"o{i}", [rng.randrange(1000) for _ in range(20)], greedy(5)) for i in range(3)]
    mixed = EngineCore(engine, EngineConfig(max_num_tokens=24)).generate_all(
        others[:1] + [EngineRequest("t", ids, params, multimodal=mm)] + others[1:])["t"]
    assert collect_text(alone_out)[1] == collect_text(mixed)[1]


def test_fps_of_an_encoded_video_is_its_sampling_rate(processor):
    """A 16-frame GIF at 4 frames per second (4 s): fps picks how many frames are kept."""
    frames = noise_frames(7, 16, 28, 28)
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=250, loop=0)
    kept = {}
    for fps in (None, 1.0, 4.0):
        content = [{"type": "video", "video": gif.getvalue(), "fps": fps}, {"type": "text", "text": "Go."}]
        _, mm = processor.process_chat([{"role": "user", "content": content}])
        (visual,) = mm.visuals
        kept[fps] = (visual.grid_thw[0] * 2, visual.second_per_grid_t)
    assert kept == {None: (8, 1.0), 1.0: (4, 2.0), 4.0: (16, 0.5)}
    with pytest.raises(FieldError, match="fps"):
        processor.process_chat([{"role": "user", "content": [{"type": "video", "video": gif.getvalue(),
                                                              "fps": float("nan")}]}])
