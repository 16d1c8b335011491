"""The real-shape VL presets carry the published Qwen2-VL-2B / Qwen2.5-VL-3B numbers (no build, no weights);
every VL family's preprocessing block comes from the checkpoint's file, else the preset."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from builder.convert import ConversionError, llm_config_from_hf
from builder.families.base import preprocessing_params
from builder.presets import PresetError, load_preset, preset_from_dict
from engine_format.llm_config import LLMConfig

# Published config.json / preprocessor_config.json of the hub checkpoints, written out by hand.
PUBLISHED = {
    "qwen2-vl-2b": {
        "hub_id": "Qwen/Qwen2-VL-2B-Instruct", "family": "qwen2_vl",
        "llm": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
        "mrope_section": [16, 24, 24],
        "vision": dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
    },
    "qwen2.5-vl-3b": {
        "hub_id": "Qwen/Qwen2.5-VL-3B-Instruct", "family": "qwen2_5_vl",
        "llm": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
        "mrope_section": [16, 24, 24],
        "vision": dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    },
}
PREPROCESSOR = dict(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_shape_preset_numbers(name: str) -> None:
    want, preset = PUBLISHED[name], load_preset(name)
    assert (preset.hub_id, preset.family, preset.source) == (want["hub_id"], want["family"], "hub")
    for key, value in want["llm"].items():
        assert preset.hf_config[key] == value, key
    assert preset.hf_config["rope_scaling"] == {"type": "mrope", "mrope_section": want["mrope_section"]}
    for key, value in want["vision"].items():
        assert preset.hf_config["vision_config"][key] == value, key
    for key, value in PREPROCESSOR.items():
        assert preset.preprocessing[key] == value, key
    assert preset.preprocessing["rescale_factor"] == pytest.approx(1 / 255)


@pytest.mark.parametrize("name,arch,layers,head_size", [
    ("qwen2-vl-2b", "Qwen2VLForConditionalGeneration", 28, 128),
    ("qwen2.5-vl-3b", "Qwen2_5_VLForConditionalGeneration", 36, 128)])
def test_real_shape_llm_config(name: str, arch: str, layers: int, head_size: int) -> None:
    preset = load_preset(name)
    cfg = llm_config_from_hf(preset.hf_config, preset.architecture, "bf16")
    assert (cfg.architecture, cfg.num_hidden_layers, cfg.head_size, cfg.dtype) == (arch, layers, head_size, "bfloat16")
    assert cfg.mrope_section == (16, 24, 24) and sum(cfg.mrope_section) == head_size // 2
    data = cfg.to_json()
    assert data["qwen_type"] == "qwen2_vl" and data["position_embedding_type"] == "mrope"
    assert data["rotary_scaling"] == {"type": "mrope", "mrope_section": [16, 24, 24]}
    assert LLMConfig.from_json(data, "llm/config.json") == cfg


def test_vl_preset_needs_preprocessing() -> None:
    base = {"name": "x", "family": "qwen2_vl", "source": "random", "hf_config": {}}
    with pytest.raises(PresetError, match="preprocessing"):
        preset_from_dict(base, "x.yaml")
    with pytest.raises(PresetError, match="missing keys"):
        preset_from_dict({**base, "preprocessing": {"patch_size": 14}}, "x.yaml")
    with pytest.raises(PresetError, match="only for the families"):
        preset_from_dict({**base, "family": "qwen2", "preprocessing": dict(PREPROCESSOR)}, "x.yaml")


def test_checkpoint_preprocessor_file_wins_over_the_preset(tmp_path: Path) -> None:
    """The rule all three builder families call (builder/families/base.preprocessing_params)."""
    def unread(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError(f"{path} does not exist and must not be read")

    with pytest.raises(ConversionError, match=re.escape(
            f"{tmp_path}: no preprocessor_config.json and no preset preprocessing parameters")):
        preprocessing_params(tmp_path, None, unread)
    preset = dict(PREPROCESSOR)
    from_preset = preprocessing_params(tmp_path, preset, unread)
    assert from_preset == preset and from_preset is not preset
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"patch_size": 16}))
    assert preprocessing_params(tmp_path, preset, lambda p, raw: {"file": p, **raw}) == {"file": path, "patch_size": 16}
