"""M-RoPE positions against HF transformers' own get_rope_index (tiny configs, random weights)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.multimodal.mrope import MRopeSpec, mrope_positions, positions_for_range

IMAGE_ID, VIDEO_ID, START_ID, END_ID = 90, 91, 92, 93
MERGE = 2
TOKENS_PER_SECOND = 2


@dataclass(frozen=True)
class Visual:
    kind: str
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float = 0.0

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // MERGE ** 2


def _hf_model(model_type: str):
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLModel as Model
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLModel as Model
    vision = {"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "out_hidden_size": 32,
              "intermediate_size": 32, "spatial_merge_size": MERGE, "tokens_per_second": TOKENS_PER_SECOND}
    config = Config(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 128,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 3, 3]}},
                    vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                    vision_start_token_id=START_ID, vision_end_token_id=END_ID)
    return Model(config).eval()


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def hf_and_spec(request):
    torch.manual_seed(0)
    spec = MRopeSpec(IMAGE_ID, VIDEO_ID, START_ID, MERGE,
                     TOKENS_PER_SECOND if request.param == "qwen2_5_vl" else 0, request.param)
    return _hf_model(request.param), spec


def _prompt(parts: list) -> tuple[list[int], list[Visual]]:
    """parts: ints (text lengths) and Visuals; each visual is wrapped in vision start / end tokens."""
    ids: list[int] = []
    visuals = []
    for part in parts:
        if isinstance(part, int):
            ids.extend(range(1, part + 1))
        else:
            ids += [START_ID] + [IMAGE_ID if part.kind == "image" else VIDEO_ID] * part.num_tokens + [END_ID]
            visuals.append(part)
    return ids, visuals


def _hf_positions(model, ids: list[int], visuals: list[Visual]) -> tuple[np.ndarray, int]:
    input_ids = torch.tensor([ids])
    types = torch.zeros_like(input_ids)
    types[input_ids == IMAGE_ID] = 1
    types[input_ids == VIDEO_ID] = 2
    images = [v.grid_thw for v in visuals if v.kind == "image"]
    videos = [v for v in visuals if v.kind == "video"]
    kwargs = {"image_grid_thw": torch.tensor(images) if images else None,
              "video_grid_thw": torch.tensor([v.grid_thw for v in videos]) if videos else None}
    if "second_per_grid_ts" in model.get_rope_index.__code__.co_varnames and videos:
        # what the HF processor returns: a float32 tensor of temporal_patch_size / fps
        kwargs["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in videos])
    positions, delta = model.get_rope_index(input_ids, mm_token_type_ids=types, **kwargs)
    return positions[:, 0].numpy(), int(delta[0, 0])


CASES = {
    "text_only": [13],
    "one_image": [5, Visual("image", (1, 4, 6)), 7],
    "two_images_different_grids": [3, Visual("image", (1, 8, 4)), 2, Visual("image", (1, 2, 10)), 4],
    "image_at_start_and_end": [Visual("image", (1, 6, 6)), 1, Visual("image", (1, 4, 4))],
    "video_fps_2": [4, Visual("video", (4, 4, 4), 2 / 2.0), 6],
    "video_fps_0.7": [4, Visual("video", (5, 2, 6), 2 / 0.7), 6],
    "video_fps_3": [2, Visual("video", (6, 4, 2), 2 / 3.0), 3],
    "video_fps_29.97": [2, Visual("video", (3, 4, 4), 2 / 29.97), 3],
    "image_and_video": [3, Visual("image", (1, 4, 6)), 2, Visual("video", (3, 4, 4), 2 / 1.5), 5,
                        Visual("image", (1, 2, 2)), 2],
}


@pytest.mark.parametrize("case", list(CASES))
def test_positions_and_delta_equal_hf(hf_and_spec, case: str) -> None:
    model, spec = hf_and_spec
    ids, visuals = _prompt(CASES[case])
    ours, delta = mrope_positions(ids, visuals, spec)
    if not visuals:     # HF's generate uses plain 1-D positions (delta 0) for text-only prompts
        expected, expected_delta = np.broadcast_to(np.arange(len(ids)), (3, len(ids))), 0
    else:
        expected, expected_delta = _hf_positions(model, ids, visuals)
    assert ours.dtype == np.int64 and ours.shape == (3, len(ids))
    np.testing.assert_array_equal(ours, expected)
    assert delta == expected_delta
    if case.startswith("video") and spec.time_aware:   # the time axis really is spaced by fps
        assert len(np.unique(ours[0])) > 1


def test_random_layouts_equal_hf(hf_and_spec) -> None:
    model, spec = hf_and_spec
    rng = random.Random(5)
    for _ in range(25):
        parts: list = [rng.randint(1, 6)]
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                parts.append(Visual("image", (1, 2 * rng.randint(1, 5), 2 * rng.randint(1, 5))))
            else:
                parts.append(Visual("video", (rng.randint(1, 6), 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)),
                                    2 / rng.choice([0.5, 1.0, 2.0, 2.5, 24.0])))
            parts.append(rng.randint(1, 6))
        ids, visuals = _prompt(parts)
        ours, delta = mrope_positions(ids, visuals, spec)
        expected, expected_delta = _hf_positions(model, ids, visuals)
        np.testing.assert_array_equal(ours, expected)
        assert delta == expected_delta


def test_decode_positions_continue_with_the_delta(hf_and_spec) -> None:
    """HF decodes token p at position p + rope_delta on every axis; so does positions_for_range."""
    _, spec = hf_and_spec
    ids, visuals = _prompt([2, Visual("image", (1, 8, 8)), 3])
    prompt, delta = mrope_positions(ids, visuals, spec)
    assert delta < 0            # 16 placeholders advance the positions by 4 only
    n = len(ids)
    whole = positions_for_range(prompt, delta, 0, n + 4)
    np.testing.assert_array_equal(whole[:, :n], prompt)
    np.testing.assert_array_equal(whole[:, n:], np.broadcast_to(np.arange(n, n + 4) + delta, (3, 4)))
    assert whole[0, n] == prompt.max() + 1
    # any split of the range gives the same rows (chunked prefill, decode)
    for start, end in [(0, 3), (3, n - 1), (n - 1, n + 1), (n + 2, n + 4)]:
        np.testing.assert_array_equal(positions_for_range(prompt, delta, start, end), whole[:, start:end])
    # the packed batch: a text chunk next to a prefill chunk repeats its 1-D positions on every axis;
    # decode chunks alone stay 1-D (p + delta), which the model repeats on every axis
    prefill = SequenceChunk(ids[:3], 0, [0], mrope_positions=positions_for_range(prompt, delta, 0, 3))
    text = SequenceChunk([1, 2, 3], 5, [1])
    both = ForwardBatch.build([prefill, text], 16, torch.device("cpu")).positions
    expected = np.concatenate([whole[:, :3], np.broadcast_to(np.arange(5, 8), (3, 3))], axis=1)
    np.testing.assert_array_equal(both.numpy(), expected)
    decode = SequenceChunk([7, 7], n + 2, [0, 1], position_delta=delta)
    only_decode = ForwardBatch.build([decode, text], 16, torch.device("cpu")).positions
    assert only_decode.dim() == 1
    np.testing.assert_array_equal(only_decode[:2].numpy(), whole[0, n + 2:n + 4])
    np.testing.assert_array_equal(only_decode[2:].numpy(), np.arange(5, 8))


@pytest.mark.parametrize("parts,visuals,match", [
    ([3, Visual("image", (1, 4, 4))], [], "has no visual"),
    ([3, Visual("image", (1, 4, 4))], [Visual("video", (1, 4, 4))], "video"),
    ([3, Visual("image", (1, 4, 4))], [Visual("image", (1, 4, 8))], "needs 8"),
    ([3, Visual("image", (1, 4, 4))], [Visual("image", (1, 4, 4))] * 2, "more visuals"),
])
def test_runs_and_visuals_must_agree(parts, visuals, match: str) -> None:
    ids, _ = _prompt(parts)
    spec = MRopeSpec(IMAGE_ID, VIDEO_ID, START_ID, MERGE)
    with pytest.raises(ValueError, match=match):
        mrope_positions(ids, visuals, spec)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_plugin_mrope_cos_sin_equal_hf_rotary_embedding(model_type: str) -> None:
    """The plugin's 3-axis cos / sin (mrope_section chunks of t / h / w frequencies) = HF's, bit for bit."""
    from plugins.reference.rope import rope_cos_sin, rope_inv_freq

    model = _hf_model(model_type)
    rotary = model.language_model.rotary_emb
    section = tuple(rotary.mrope_section)
    head_size = 2 * sum(section)
    ids, visuals = _prompt([3, Visual("image", (1, 4, 6)), 2, Visual("video", (3, 4, 4), 1.0), 4])
    positions = torch.from_numpy(mrope_positions(ids, visuals, MRopeSpec(IMAGE_ID, VIDEO_ID, START_ID, MERGE))[0])
    positions = positions + 1000      # large positions: float32 rounding must match too
    inv_freq = rope_inv_freq(head_size, 10000.0, {"type": "mrope", "mrope_section": list(section)})
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32, section)
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), positions[:, None, :])
    assert torch.equal(cos, ref_cos[0]) and torch.equal(sin, ref_sin[0])
    # the axes really differ per chunk: a 1-D cos over the temporal axis would not match
    assert not torch.equal(rope_cos_sin(positions[0], inv_freq, torch.float32)[0], ref_cos[0])
    with pytest.raises(ValueError, match="M-RoPE"):
        rope_cos_sin(positions[:2], inv_freq, torch.float32, section)
