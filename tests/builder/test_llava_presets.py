"""The real-shape LLaVA presets carry the published llava-1.5-7b-hf / llava-v1.6-vicuna-7b-hf numbers.

No build, no weights: the preset's numbers against a table written by hand from the hub checkpoints'
config.json and preprocessor_config.json (llava-hf's text_config is sparse: the rest are LlamaConfig
defaults, written out here), then the LLM config and the vision/config.json schema the builder derives
from them, and the tensor count that says "7B".
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from builder.convert import llm_config_from_hf
from builder.families import build_family_for
from builder.presets import load_preset
from engine_format.families.llava import parse, tensor_shapes
from engine_format.checkpoint_layout import expected_tensor_shapes
from engine_format.errors import EngineLoadError

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TEXT = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
            rope_theta=10000.0)
VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
PUBLISHED = {
    "llava-1.5-7b": dict(hub_id="llava-hf/llava-1.5-7b-hf", family="llava", pinpoints=[], params=7_063_427_072),
    "llava-v1.6-vicuna-7b": dict(hub_id="llava-hf/llava-v1.6-vicuna-7b-hf", family="llava_next", pinpoints=PINPOINTS,
                                 params=7_063_427_072 + 4096),
}
PREPROCESSOR = dict(image_size=336, image_mean=[0.48145466, 0.4578275, 0.40821073],
                    image_std=[0.26862954, 0.26130258, 0.27577711], do_pad=False)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_shape_llava_preset_numbers(name: str, tmp_path: Path) -> None:
    want, preset = PUBLISHED[name], load_preset(name)
    assert (preset.hub_id, preset.family, preset.source) == (want["hub_id"], want["family"], "hub")
    hf = preset.hf_config
    assert {k: hf["text_config"][k] for k in TEXT} == TEXT
    assert {k: hf["vision_config"][k] for k in VISION} == VISION
    assert (hf["image_token_index"], hf["vision_feature_layer"], hf["vision_feature_select_strategy"],
            hf["projector_hidden_act"], hf["tie_word_embeddings"]) == (32000, -2, "default", "gelu", False)
    assert hf.get("image_grid_pinpoints", []) == want["pinpoints"] == preset.preprocessing["image_grid_pinpoints"]
    assert {k: preset.preprocessing[k] for k in PREPROCESSOR} == PREPROCESSOR
    assert preset.preprocessing["rescale_factor"] == pytest.approx(1 / 255)

    family = build_family_for(preset.family)
    config_json = {**hf, "model_type": preset.family}
    llm = llm_config_from_hf(config_json, family.llm_architecture(config_json), "fp16",
                             text=family.text_config(config_json))
    assert (llm.architecture, llm.num_hidden_layers, llm.head_size, llm.vocab_size, llm.mrope_section,
            llm.tie_word_embeddings) == ("LlamaForCausalLM", 32, 128, 32064, None, False)
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    vision = parse(family.vision_config_json(tmp_path, "fp16", preset.preprocessing), "vision/config.json")
    assert (vision.num_layers, vision.tokens_per_crop, vision.out_hidden_size, vision.image_token_id,
            vision.position_scheme) == (23, 576, 4096, 32000, "rope")
    count = lambda shapes: sum(_numel(s) for s in shapes.values())    # noqa: E731
    # the full checkpoint holds the tower's 24th layer and post_layernorm, which the engine does not store
    unused_layer = 4 * (1024 * 1024 + 1024) + 4 * 1024 + 2 * 4096 * 1024 + 4096 + 1024 + 2 * 1024
    assert count(expected_tensor_shapes(llm)) + count(tensor_shapes(vision)) + unused_layer == want["params"]


@pytest.mark.parametrize("key,bad", [("image_std", [1, 0, 1]), ("image_mean", [0.5, 0.5]), ("image_std", None)])
def test_vision_config_refuses_bad_mean_and_std(key: str, bad: object, tmp_path: Path) -> None:
    """engine_format's LLaVA schema (the check it shares with Qwen2-VL's, families/base.check_mean_std)."""
    preset = load_preset("llava-1.5-7b")
    family = build_family_for(preset.family)
    (tmp_path / "config.json").write_text(json.dumps({**preset.hf_config, "model_type": preset.family}))
    data = family.vision_config_json(tmp_path, "fp16", preset.preprocessing)
    with pytest.raises(EngineLoadError, match=re.escape(f"preprocessing.{key}")):
        parse({**data, "preprocessing": {**data["preprocessing"], key: bad}}, "vision/config.json")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_text_models_a_llava_checkpoint_may_hold() -> None:
    """Llama and Llama-shaped Mistral (no sliding window) become LlamaForCausalLM; anything else is refused,
    naming the config field."""
    from builder.convert import ConversionError

    family = build_family_for("llava_next")
    base = {**load_preset("llava-v1.6-vicuna-7b").hf_config, "model_type": "llava_next"}
    mistral = {"model_type": "mistral", "vocab_size": 32064, "sliding_window": None}
    assert family.llm_architecture({**base, "text_config": mistral}) == "LlamaForCausalLM"
    for text, field in (({**mistral, "sliding_window": 4096}, "sliding_window"),
                        ({"model_type": "qwen2", "vocab_size": 32064}, "model_type")):
        with pytest.raises(ConversionError, match=f"text_config.{field}"):
            family.llm_architecture({**base, "text_config": text})


def test_processor_chat_template_is_copied_into_the_engine_tokenizer(tmp_path: Path, cache_dir: Path) -> None:
    """llava-hf checkpoints keep their chat template in chat_template.json, which AutoTokenizer ignores."""
    from transformers import AutoTokenizer

    from builder.families.llava import CHAT_TEMPLATE
    from builder.pipeline import _copy_tokenizer
    from builder.source import ResolvedSource
    from builder.tokenizer import offline_tokenizer_dir

    hf_dir = tmp_path / "checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(str(offline_tokenizer_dir(cache_dir)))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(hf_dir))
    (hf_dir / "chat_template.jinja").unlink(missing_ok=True)
    assert AutoTokenizer.from_pretrained(str(hf_dir)).chat_template is None
    (hf_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    source = ResolvedSource(hf_dir, hf_dir, "llava", "LlavaForConditionalGeneration", False, {})
    _copy_tokenizer(source, tmp_path / "engine-tokenizer", {})
    assert AutoTokenizer.from_pretrained(str(tmp_path / "engine-tokenizer")).chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_random_weight_config_of_the_real_shape(name: str, cache_dir: Path) -> None:
    """RANDOM_WEIGHTS=1 builds these shapes with the offline tokenizer: the config transformers gets keeps the
    published sizes and points image_token_index at that tokenizer's <image>."""
    from transformers import AutoConfig

    from builder.source import hf_config_dict
    from builder.tokenizer import extended_tokenizer_dir, special_token_ids

    preset = load_preset(name)
    tokens = build_family_for(preset.family).offline_tokenizer
    tokenizer_dir = extended_tokenizer_dir(cache_dir, tokens.special_tokens, tokens.chat_template)
    config = AutoConfig.for_model(preset.family, **hf_config_dict(preset, tokenizer_dir))
    text = config.text_config.to_dict()
    assert {k: text[k] for k in TEXT if k != "rope_theta"} == {k: v for k, v in TEXT.items() if k != "rope_theta"}
    assert text["rope_parameters"]["rope_theta"] == TEXT["rope_theta"]
    assert config.image_token_id == special_token_ids(tokenizer_dir)["<image>"]
    assert config.vision_config.num_hidden_layers == 24 and config.vision_config.image_size == 336
