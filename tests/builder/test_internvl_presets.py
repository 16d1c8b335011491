"""The real-shape `internvl2.5-1b` preset carries the published InternVL2.5-1B numbers (no build, no weights).

The table is written out by hand from OpenGVLab/InternVL2_5-1B's config.json (InternViT-300M-448px-V2_5 +
Qwen2.5-0.5B-Instruct: `vision_config`, `llm_config`, downsample_ratio, force_image_size,
min / max_dynamic_patch, use_thumbnail) and its model card's preprocessing (ImageNet mean / std, 448 px
tiles, bicubic), and checked against the preset and the LLM / vision configs the builder derives from it.
"""
from __future__ import annotations

import pytest

from builder.convert import llm_config_from_hf
from builder.families.internvl import FAMILY
from builder.presets import load_preset
from engine_format.families.internvl import InternVLVisionConfig
from engine_format.llm_config import LLMConfig

PUBLISHED_LLM = dict(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                     rms_norm_eps=1e-6, rope_theta=1000000.0)
PUBLISHED_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=448, patch_size=14, attention_bias=True, layer_norm_eps=1e-6, hidden_act="gelu")
PUBLISHED_TILING = dict(tile_size=448, patch_size=14, min_tiles=1, max_tiles=12, use_thumbnail=True,
                        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def preset():
    return load_preset("internvl2.5-1b")


def test_real_shape_preset_numbers(preset) -> None:
    assert (preset.hub_id, preset.family, preset.source, preset.tokenizer) == (
        "OpenGVLab/InternVL2_5-1B", "internvl", "hub", "source")
    for key, value in PUBLISHED_LLM.items():
        assert preset.hf_config["text_config"][key] == value, key
    for key, value in PUBLISHED_VISION.items():
        assert preset.hf_config["vision_config"][key] == value, key
    assert preset.hf_config["downsample_ratio"] == 0.5 and preset.hf_config["tie_word_embeddings"] is False
    for key, value in PUBLISHED_TILING.items():
        assert preset.preprocessing[key] == value, key
    assert preset.preprocessing["rescale_factor"] == pytest.approx(1 / 255)


def test_real_shape_configs(preset) -> None:
    """Qwen2ForCausalLM with plain RoPE (head 64); the tower gives 256 rows of width 896 per 448 px tile."""
    cfg = llm_config_from_hf(preset.hf_config, FAMILY.llm_architecture(preset.hf_config), "bf16",
                             text=FAMILY.text_config(preset.hf_config))
    assert (cfg.architecture, cfg.head_size, cfg.num_hidden_layers, cfg.mrope_section) == (
        "Qwen2ForCausalLM", 64, 24, None)
    assert cfg.to_json()["position_embedding_type"] == "rope_gpt_neox" and cfg.attn_bias
    assert LLMConfig.from_json(cfg.to_json(), "llm/config.json") == cfg
    vision = {**PUBLISHED_VISION, "num_channels": 3}
    data = {"model_type": "internvl", "dtype": "bfloat16", "vision": vision, "downsample_ratio": 0.5,
            "projector_hidden_act": "gelu", "out_hidden_size": cfg.hidden_size, "image_token_id": 151667,
            "image_start_token_id": 151665, "image_end_token_id": 151666,
            "preprocessing": {**preset.preprocessing}}
    tower = InternVLVisionConfig.from_json(data, "vision/config.json")
    assert (tower.patches_per_tile, tower.tokens_per_tile, tower.head_dim) == (1024, 256, 64)


def test_llama_language_model() -> None:
    """InternVL on a Llama LLM (OpenGVLab's llm_config or transformers' text_config): LlamaForCausalLM, no qkv bias."""
    llama = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0)
    opengvlab = {"model_type": "internvl_chat", "llm_config": {**llama, "architectures": ["LlamaForCausalLM"]},
                 "vision_config": {"hidden_size": 32, "qkv_bias": True}, "downsample_ratio": 0.5}
    for hf_config in ({"model_type": "internvl", "text_config": llama}, opengvlab):
        arch = FAMILY.llm_architecture(hf_config)
        cfg = llm_config_from_hf(hf_config, arch, "fp32", text=FAMILY.text_config(hf_config))
        assert (cfg.architecture, cfg.attn_bias, cfg.head_size, cfg.mrope_section) == (
            "LlamaForCausalLM", False, 16, None)


def test_unsupported_language_models_are_named() -> None:
    from builder.convert import ConversionError

    internlm = {"model_type": "internvl_chat", "llm_config": {"architectures": ["InternLM2ForCausalLM"]}}
    with pytest.raises(ConversionError, match="InternLM2ForCausalLM"):
        FAMILY.llm_architecture(internlm)
    with pytest.raises(ConversionError, match="ps_version"):
        FAMILY.text_config({**internlm, "llm_config": {"architectures": ["Qwen2ForCausalLM"]}, "ps_version": "v1"})
