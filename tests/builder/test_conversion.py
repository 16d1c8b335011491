"""Checkpoint names and contents against the HF tensors, through REFERENCE.md section 3's table."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from builder.convert import read_hf_state_dict
from tests.conftest import hf_dir_of

# checkpoint name -> HF names (concatenated on dim 0), written from the table, not from the converter.
LAYER_TABLE = {
    "input_layernorm.weight": ["input_layernorm.weight"],
    "attention.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attention.dense.weight": ["self_attn.o_proj.weight"],
    "post_layernorm.weight": ["post_attention_layernorm.weight"],
    "mlp.fc.weight": ["mlp.gate_proj.weight"],
    "mlp.gate.weight": ["mlp.up_proj.weight"],
    "mlp.proj.weight": ["mlp.down_proj.weight"],
}


def expected_mapping(num_layers: int, qkv_bias: bool, tied: bool) -> dict[str, list[str]]:
    mapping = {
        "transformer.vocab_embedding.weight": ["model.embed_tokens.weight"],
        "transformer.ln_f.weight": ["model.norm.weight"],
        "lm_head.weight": ["model.embed_tokens.weight" if tied else "lm_head.weight"],
    }
    for i in range(num_layers):
        for ours, theirs in LAYER_TABLE.items():
            mapping[f"transformer.layers.{i}.{ours}"] = [f"model.layers.{i}.{n}" for n in theirs]
        if qkv_bias:
            mapping[f"transformer.layers.{i}.attention.qkv.bias"] = [
                f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"]
    return mapping


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-llama"])
def test_checkpoint_matches_hf_through_mapping_table(build_tiny, preset: str) -> None:
    engine = build_tiny(preset)
    config = json.loads((engine / "llm" / "config.json").read_text())
    ours = load_file(str(engine / "llm" / "rank0.safetensors"))
    hf = read_hf_state_dict(hf_dir_of(engine))
    qwen = preset == "tiny-qwen2"
    mapping = expected_mapping(config["num_hidden_layers"], qkv_bias=qwen, tied=config["tie_word_embeddings"])
    assert set(ours) == set(mapping)
    for name, sources in mapping.items():
        torch.testing.assert_close(ours[name], torch.cat([hf[s] for s in sources], dim=0), rtol=0, atol=0)
    # Biases and norms were perturbed away from their defaults, so the test can see them.
    assert not torch.all(ours["transformer.ln_f.weight"] == 1)
    if qwen:
        assert ours["transformer.layers.0.attention.qkv.bias"].abs().sum() > 0


@pytest.mark.parametrize("preset,arch,tied", [("tiny-qwen2", "Qwen2ForCausalLM", True),
                                               ("tiny-llama", "LlamaForCausalLM", False)])
def test_checkpoint_config_fields(build_tiny, preset: str, arch: str, tied: bool) -> None:
    config = json.loads((build_tiny(preset) / "llm" / "config.json").read_text())
    assert config["architecture"] == arch
    assert config["dtype"] == "float32"
    assert config["position_embedding_type"] == "rope_gpt_neox"
    assert config["tie_word_embeddings"] is tied
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert set(config["quantization"]) == {"quant_algo", "kv_cache_quant_algo"}
    assert config["quantization"]["quant_algo"] is None
    if arch == "Qwen2ForCausalLM":
        assert config["qwen_type"] == "qwen2"
    else:
        assert config["rotary_scaling"]["type"] == "llama3"
        assert "qwen_type" not in config
