"""The LLaVA tower (CLIP + projector) and NeXT's row gathering equal transformers' get_image_features.

Reference: transformers 5.x `LlavaModel` / `LlavaNextModel.get_image_features` (hidden state
`vision_feature_layer` -2, class token dropped, projector, and for NeXT `pack_image_features`:
unpadding and image_newline rows) on tiny random configs with perturbed weights, read through the
builder's key mapping of the layout `save_pretrained` writes (llava-hf's) and of transformers'
in-memory layout. Tolerance: 1e-5 absolute (float32, same op order; seen 0.0). The placeholder
counts equal HF's LlavaProcessor / LlavaNextProcessor arithmetic.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from builder.families.llava import FAMILY
from engine_format.families.llava import parse, tensor_shapes
from runtime.families.llava import LlavaFamily

VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16)
TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300)
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
# (height, width): 4x4 grid unpadded to 2x4 (50x90) and 2x6 to 2x4 (33x70), 3x1, a square, a thin one
SIZES = [(50, 90), (33, 70), (120, 40), (40, 40), (23, 97)]
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple]:
    """{is NeXT: (HF model, our parsed config, its save_pretrained directory)}, made once per module."""
    out = {}
    for next_ in (False, True):
        tmp = tmp_path_factory.mktemp("llava-next" if next_ else "llava")
        out[next_] = (*_model(next_, tmp), tmp)
    return out


def _model(next_: bool, tmp: Path):
    torch.manual_seed(3)
    config_class, model_class = ((LlavaNextConfig, LlavaNextForConditionalGeneration) if next_
                                 else (LlavaConfig, LlavaForConditionalGeneration))
    extra = {"image_grid_pinpoints": PINPOINTS} if next_ else {}
    model = model_class(config_class(vision_config=VISION, text_config=TEXT, image_token_index=299, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp))
    pre = {"image_size": 28, "image_mean": MEAN, "image_std": STD, "rescale_factor": 1 / 255, "do_pad": False,
           "image_grid_pinpoints": PINPOINTS if next_ else []}
    cfg = parse(FAMILY.vision_config_json(tmp, "fp32", pre), "vision/config.json")
    return model, cfg


@pytest.mark.parametrize("next_", [False, True], ids=["llava-1.5", "llava-next"])
def test_rows_equal_hf_get_image_features(next_: bool, tiny_models: dict[bool, tuple]) -> None:
    model, cfg, tmp_path = tiny_models[next_]
    family = LlavaFamily(cfg)
    for state in (load_file(str(tmp_path / "model.safetensors")), model.state_dict()):     # both key layouts
        weights = {k: v.float() for k, v in FAMILY.vision_tensors(state, cfg).items()}
        assert set(weights) == set(tensor_shapes(cfg))
        grids = [family.grid_of(h, w) for h, w in SIZES]
        pixels = family.random_pixels(grids, torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = family.forward(weights, family.encoder_feed(pixels, grids), segmented=True)
            if next_:
                chunks = pixels.split([g[0] for g in grids])
                padded = torch.zeros(len(grids), max(g[0] for g in grids), *pixels.shape[1:])
                for i, chunk in enumerate(chunks):
                    padded[i, :len(chunk)] = chunk
                ref = model.model.get_image_features(padded, torch.tensor(SIZES)).pooler_output
            else:
                ref = model.model.get_image_features(pixels).pooler_output
        ref = torch.cat([r.reshape(-1, cfg.out_hidden_size) for r in ref])
        assert ours.shape == ref.shape
        assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_token_counts_equal_hf_processor() -> None:
    """num_embeds of every size equals HF LlavaNextProcessor's count (real 336-px geometry and the tiny one)."""
    from runtime.families.llava.geometry import num_image_tokens

    class _Tokenizer:       # the processor only reads the image token's id
        image_token, image_token_id = "<image>", 0

    class _Images:
        def __init__(self, pinpoints: list[list[int]]) -> None:
            self.image_grid_pinpoints = pinpoints

    for side, pinpoints in ((28, PINPOINTS), (336, [[336 * a // 28, 336 * b // 28] for a, b in PINPOINTS])):
        pre = {"image_size": side, "image_mean": MEAN, "image_std": STD, "rescale_factor": 1 / 255,
               "do_pad": False, "image_grid_pinpoints": pinpoints}
        data = {"model_type": "llava_next", "dtype": "float32", "out_hidden_size": 64, "image_token_id": 299,
                "preprocessing": pre, "vision": {**{k: v for k, v in VISION.items() if k != "model_type"},
                                                 "image_size": side, "num_channels": 3, "layer_norm_eps": 1e-5,
                                                 "hidden_act": "quick_gelu", "vision_feature_layer": -2,
                                                 "vision_feature_select_strategy": "default",
                                                 "multimodal_projector_bias": True, "image_grid_pinpoints": pinpoints}}
        cfg = parse(json.loads(json.dumps(data)), "vision/config.json")
        processor = LlavaNextProcessor.__new__(LlavaNextProcessor)
        processor.image_processor, processor.patch_size = _Images(pinpoints), 14
        processor.num_additional_image_tokens, processor.vision_feature_select_strategy = 0, "default"
        rng = np.random.default_rng(side)
        for h, w in [*(rng.integers(1, 4 * side, size=(40, 2)).tolist()), *SIZES]:
            assert num_image_tokens(cfg, h, w) == processor._get_number_of_features(h, w, side, side), (side, h, w)


def test_encoder_feed_refuses_grids_and_pixels_that_do_not_fit(tiny_models: dict[bool, tuple]) -> None:
    from runtime.errors import FieldError

    _, cfg, _ = tiny_models[True]
    family = LlavaFamily(cfg)
    grid = family.grid_of(50, 90)
    pixels = family.random_pixels([grid], torch.Generator().manual_seed(0))
    for bad_grid, field in (((5, 2, 2, 50, 90, 1, 4), "grid_thw[0]"), ((5, 2, 2), "grid_thw[0]"),
                            ((1, 2, 2, 0, 90, 1, 1), "grid_thw[0]")):
        with pytest.raises(FieldError) as info:
            family.encoder_feed(pixels[:bad_grid[0]], [bad_grid])
        assert info.value.field == field
    with pytest.raises(FieldError) as info:
        family.encoder_feed(pixels[:3], [grid])
    assert info.value.field == "pixel_values"
    feed = family.encoder_feed(pixels, [tuple(np.int64(x) for x in grid)])      # numpy integers are fine
    visual = family.preprocess_image(Image.new("RGB", (90, 50)), "image")
    assert visual.grid_thw == grid and feed["gather_index"].shape == (visual.num_tokens,) == (14,)


def test_checkpoint_layouts_convert_to_the_same_engine_tensors(tiny_models: dict[bool, tuple]) -> None:
    """transformers 5 in memory (model.vision_tower.*, model.language_model.*, lm_head), save_pretrained's
    llava-hf layout (vision_tower.*, language_model.model.*, language_model.lm_head) and the older hub
    spelling with CLIPVisionModel's inner vision_model. give the same vision and LLM tensors."""
    from builder.convert import convert_state_dict, llm_config_from_hf

    model, cfg, tmp_path = tiny_models[True]
    saved = load_file(str(tmp_path / "model.safetensors"))
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
           for k, v in saved.items()}
    hf_config = json.loads((tmp_path / "config.json").read_text())
    llm = llm_config_from_hf(hf_config, FAMILY.llm_architecture(hf_config), "fp32", FAMILY.text_config(hf_config))
    results = []
    for state in (model.state_dict(), saved, hub):
        keys = FAMILY.llm_keys(state.keys())
        results.append((FAMILY.vision_tensors(state, cfg), convert_state_dict(state, llm, keys.prefix, keys.lm_head)))
    for vision, tensors in results[1:]:
        assert vision.keys() == results[0][0].keys() and tensors.keys() == results[0][1].keys()
        assert all(torch.equal(vision[k], results[0][0][k]) for k in vision)
        assert all(torch.equal(tensors[k], results[0][1][k]) for k in tensors)
