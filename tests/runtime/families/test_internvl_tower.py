"""The InternVL tower (InternViT, pixel shuffle 0.5, mlp1 projector) equals transformers' InternVLModel.

Reference: `InternVLModel.get_image_features` (vision_feature_layer -1, "default" strategy) of a tiny random
`InternVLForConditionalGeneration` with every tower / projector parameter perturbed (HF initialises the CLS
token and position embeddings to zero and the layer scales to a constant), both in float64: max abs error
below 1e-10. The three checkpoint layouts (transformers in memory, save_pretrained / -hf, OpenGVLab's
`vision_model.*` + `mlp1.*` with a fused qkv, whose names are written out here by hand) give the same engine
tensors. Also the family's prompt expansion and the encoder feed's refusals.
"""
from __future__ import annotations

import pytest
import torch

from builder.families.internvl import engine_tensors
from engine_format.families.internvl import InternVLVisionConfig, internvl_tensor_shapes
from runtime.errors import FieldError
from runtime.families.internvl import InternVLFamily
from runtime.multimodal.image_processing import ProcessedVisual
from tests.helpers.internvl_helpers import opengvlab_tower_state

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=112,
              patch_size=14, attention_bias=True, layer_norm_eps=1e-6)
TEXT_HIDDEN = 48
PREPROCESSING = {"tile_size": 112, "patch_size": 14, "min_tiles": 1, "max_tiles": 12, "use_thumbnail": True,
                 "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "rescale_factor": 1 / 255}
IDS = {"image_token_id": 90, "image_start_token_id": 91, "image_end_token_id": 92, "video_token_id": 93}


@pytest.fixture(scope="module")
def hf_model():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config=VISION, image_token_id=90, image_seq_length=16, tie_word_embeddings=False,
        text_config=dict(model_type="qwen2", hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval().double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def family() -> InternVLFamily:
    data = {"model_type": "internvl", "dtype": "float32", "vision": {**VISION, "hidden_act": "gelu", "num_channels": 3},
            "downsample_ratio": 0.5, "projector_hidden_act": "gelu", "out_hidden_size": TEXT_HIDDEN,
            **IDS, "preprocessing": PREPROCESSING}
    return InternVLFamily(InternVLVisionConfig.from_json(data, "vision/config.json"))


def hf_layout_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("model.")}


def opengvlab_state(model) -> dict[str, torch.Tensor]:
    """The tower and projector under OpenGVLab's names, written out by hand (qkv fused on the output dim)."""
    sd = model.state_dict()
    out = opengvlab_tower_state(sd, "model.", VISION["num_hidden_layers"])
    out["language_model.model.embed_tokens.weight"] = sd["model.language_model.embed_tokens.weight"]
    return out


def test_tower_equals_hf_float64(hf_model, family: InternVLFamily) -> None:
    weights = engine_tensors(hf_layout_state(hf_model), VISION["hidden_size"])
    assert {k: tuple(v.shape) for k, v in weights.items()} == internvl_tensor_shapes(family.config)
    grids = [(3, 8, 8), (1, 8, 8)]
    pixels = torch.randn(4, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = family.forward(weights, family.encoder_feed(pixels, grids), segmented=False)
    with torch.no_grad():
        ref = hf_model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                vision_feature_select_strategy="default").pooler_output
    assert ours.shape == (4 * 16, TEXT_HIDDEN) and ours.dtype == torch.float64
    assert (ours - ref.reshape(-1, TEXT_HIDDEN)).abs().max().item() < 1e-10


def test_three_layouts_give_the_same_engine_tensors(hf_model) -> None:
    width = VISION["hidden_size"]
    in_memory = engine_tensors(hf_layout_state(hf_model), width)
    on_disk = {k[len("model."):] if k.startswith(("model.vision_tower.", "model.multi_modal_projector.")) else k: v
               for k, v in hf_layout_state(hf_model).items()}
    for state in (on_disk, opengvlab_state(hf_model)):
        mapped = engine_tensors(state, width)
        assert sorted(mapped) == sorted(in_memory)
        assert all(torch.equal(mapped[k], in_memory[k]) for k in in_memory)


def test_expand_image_and_video(family: InternVLFamily) -> None:
    def visual(kind: str, tiles: int) -> ProcessedVisual:
        return ProcessedVisual(kind, torch.zeros(0).numpy(), (tiles, 8, 8), 0.0, f"h{tiles}")

    image = family.expand("image", [visual("image", 3)], tokenize=lambda text: [])
    assert image.token_ids == (91,) + (90,) * 48 + (92,) and image.spans == ((1, 48),)
    texts: list[str] = []
    video = family.expand("video", [visual("video", 1)] * 2, tokenize=lambda text: texts.append(text) or [7, 8])
    assert texts == ["Frame1: ", "\nFrame2: "]
    assert video.token_ids == (7, 8, 91) + (90,) * 16 + (92, 7, 8, 91) + (90,) * 16 + (92,)
    assert video.spans == ((3, 16), (23, 16))
    assert family.positions([1, 2, 3], []) == (None, 0)


def test_encoder_feed_refuses_what_does_not_fit(family: InternVLFamily) -> None:
    with pytest.raises(FieldError, match=r"grid_thw\[1\]"):
        family.encoder_feed(torch.zeros(2, 3, 112, 112), [(1, 8, 8), (1, 4, 8)])
    with pytest.raises(FieldError, match="pixel_values"):
        family.encoder_feed(torch.zeros(3, 3, 112, 112), [(1, 8, 8), (1, 8, 8)])
    with pytest.raises(FieldError, match="pixel_values"):
        family.encoder_feed(torch.zeros(1, 3, 112, 112, dtype=torch.int64), [(1, 8, 8)])
