"""Qwen2-VL / Qwen2.5-VL builds: manifest, LLM + vision conversion for both HF key layouts, the tower
against transformers (float32, max |diff| <= 1e-5 * max(1, max |HF|)), ONNX Runtime against PyTorch
at patch counts other than the traced one, and the vision report in validation.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.convert import read_hf_state_dict
from builder.pipeline import BuildRequest, build_engine
from builder.progress import Progress
from builder.families.qwen2_vl import hf_tower
from runtime.families.qwen2_vl import EXPORT_GRIDS
from engine_format.engine_dir import load_engine
from runtime.vision.vision_encoder import (
    OnnxVisionEncoder,
    TorchVisionEncoder,
    load_vision_encoder,
)
from tests.conftest import hf_dir_of

PRESETS = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
ARCH = {"tiny-qwen2-vl": "Qwen2VLForConditionalGeneration",
        "tiny-qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration"}
TOL = 1e-5
# Several images per call, videos (t > 1), grids above the tiny Qwen2.5-VL window (4 x 4 patches).
CALLS = [[(1, 2, 2)], [(1, 4, 4), (1, 6, 10)], [(2, 8, 6)], [(1, 16, 16), (3, 4, 2), (1, 2, 14)]]

# checkpoint name -> HF LLM names (concatenated on dim 0) relative to the LLM prefix; written from
# REFERENCE.md section 3, not from the converter.
LAYER_TABLE = {
    "input_layernorm.weight": ["input_layernorm.weight"],
    "attention.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attention.qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "attention.dense.weight": ["self_attn.o_proj.weight"],
    "post_layernorm.weight": ["post_attention_layernorm.weight"],
    "mlp.fc.weight": ["mlp.gate_proj.weight"],
    "mlp.gate.weight": ["mlp.up_proj.weight"],
    "mlp.proj.weight": ["mlp.down_proj.weight"],
}
# hub layout -> transformers 5 layout
TO_TRANSFORMERS5 = (("model.", "model.language_model."), ("visual.", "model.visual."))


def llm_mapping(num_layers: int, prefix: str) -> dict[str, list[str]]:
    mapping = {"transformer.vocab_embedding.weight": [prefix + "embed_tokens.weight"],
               "transformer.ln_f.weight": [prefix + "norm.weight"],
               "lm_head.weight": [prefix + "embed_tokens.weight"]}            # the tiny presets tie the head
    for i in range(num_layers):
        for ours, theirs in LAYER_TABLE.items():
            mapping[f"transformer.layers.{i}.{ours}"] = [f"{prefix}layers.{i}.{name}" for name in theirs]
    return mapping


def assert_converted(engine: Path, hf: dict[str, torch.Tensor], llm_prefix: str, vision_prefix: str) -> None:
    config = json.loads((engine / "llm" / "config.json").read_text())
    ours = load_file(str(engine / "llm" / "rank0.safetensors"))
    mapping = llm_mapping(config["num_hidden_layers"], llm_prefix)
    assert set(ours) == set(mapping)
    for name, sources in mapping.items():
        torch.testing.assert_close(ours[name], torch.cat([hf[s] for s in sources]), rtol=0, atol=0)
    vision = load_file(str(engine / "vision" / "encoder.safetensors"))
    hf_vision = {k[len(vision_prefix):]: t for k, t in hf.items() if k.startswith(vision_prefix)}
    assert set(vision) == set(hf_vision) and len(vision) > 0
    for name, tensor in vision.items():
        torch.testing.assert_close(tensor, hf_vision[name], rtol=0, atol=0)


def random_pixels(grids: list[tuple[int, int, int]], patch_dim: int, seed: int) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, patch_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_vl_manifest_and_llm_config(build_tiny, preset: str) -> None:
    root = build_tiny(preset)
    manifest = json.loads((root / "engine.json").read_text())
    assert manifest["source"]["architecture"] == ARCH[preset]
    assert manifest["components"]["vision"] == {"config": "vision/config.json",
                                                "weights": "vision/encoder.safetensors", "onnx": "vision/encoder.onnx"}
    assert {"vision/config.json", "vision/encoder.safetensors", "vision/encoder.onnx"} <= set(manifest["files"])
    assert manifest["compile"]["tensorrt_vision"] == {
        "built": False, "reason": "tensorrt is not installed; the vision tower runs on ONNX Runtime or PyTorch"}
    config = json.loads((root / "llm" / "config.json").read_text())
    assert (config["architecture"], config["qwen_type"], config["position_embedding_type"]) == (
        ARCH[preset], "qwen2_vl", "mrope")
    assert config["rotary_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    engine = load_engine(root)
    assert engine.llm_config.mrope_section == (2, 3, 3)
    vision = engine.vision.config
    hf_config = json.loads((hf_dir_of(root) / "config.json").read_text())
    assert (vision.image_token_id, vision.video_token_id, vision.vision_start_token_id,
            vision.vision_end_token_id) == tuple(hf_config[k] for k in (
                "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))
    assert vision.preprocessing["max_pixels"] == 64 * 28 * 28 and vision.out_hidden_size == 64


@pytest.mark.parametrize("preset", PRESETS)
def test_conversion_hub_layout(build_tiny, preset: str) -> None:
    root = build_tiny(preset)
    hf = read_hf_state_dict(hf_dir_of(root))
    assert any(k.startswith("model.layers.") for k in hf) and any(k.startswith("visual.") for k in hf)
    assert_converted(root, hf, "model.", "visual.")
    assert not torch.all(load_file(str(root / "vision" / "encoder.safetensors"))["blocks.0.norm1.weight"] == 1)


@pytest.mark.parametrize("preset", PRESETS)
def test_conversion_transformers5_layout(build_tiny, preset: str, tmp_path: Path, cache_dir: Path) -> None:
    """The same checkpoint saved with transformers 5's in-memory names builds to the same tensors."""
    src = hf_dir_of(build_tiny(preset))
    renamed_dir = tmp_path / "hf"
    shutil.copytree(src, renamed_dir)
    renamed = {}
    for key, tensor in read_hf_state_dict(src).items():
        old, new = next((o, n) for o, n in TO_TRANSFORMERS5 if key.startswith(o))
        renamed[new + key[len(old):]] = tensor
    for path in renamed_dir.glob("*.safetensors"):
        path.unlink()
    save_file(renamed, str(renamed_dir / "model.safetensors"))
    out = tmp_path / "engine"
    build_engine(BuildRequest(model=str(renamed_dir), output=out, cache_dir=cache_dir, validate=False),
                 Progress(6, enabled=False))
    assert_converted(out, renamed, "model.language_model.", "model.visual.")


@pytest.mark.parametrize("preset", PRESETS)
def test_pytorch_tower_matches_hf(build_tiny, preset: str) -> None:
    engine = load_engine(build_tiny(preset))
    ours = load_vision_encoder(engine, "pytorch")
    assert isinstance(ours, TorchVisionEncoder)
    hf = hf_tower(hf_dir_of(engine.root), torch.float32)
    cfg = engine.vision.config
    for seed, grids in enumerate(CALLS):
        pixels = random_pixels(grids, cfg.patch_dim, seed)
        with torch.inference_mode():
            ref = hf(pixels, grid_thw=torch.tensor(grids)).pooler_output
        out = ours.encode(pixels, grids)
        assert out.shape == (sum(t * h * w for t, h, w in grids) // 4, 64) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0, atol=TOL * max(1.0, float(ref.abs().max())))
        # one image at a time gives the same rows: images do not see each other
        sizes = [t * h * w for t, h, w in grids]
        alone = [ours.encode(chunk, [grid]) for chunk, grid in zip(pixels.split(sizes), grids)]
        torch.testing.assert_close(torch.cat(alone), out, rtol=0, atol=TOL * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("preset", PRESETS)
def test_onnxruntime_matches_pytorch_at_other_patch_counts(build_tiny, preset: str) -> None:
    engine = load_engine(build_tiny(preset))
    ort = load_vision_encoder(engine, "onnxruntime")
    assert isinstance(ort, OnnxVisionEncoder)
    assert isinstance(load_vision_encoder(engine, "auto"), TorchVisionEncoder)   # Qwen on the CPU: batches images
    grouped = OnnxVisionEncoder(str(engine.vision.onnx_path), engine.vision.config, max_patches_per_call=64)
    ours = load_vision_encoder(engine, "pytorch")
    traced = sum(t * h * w for t, h, w in EXPORT_GRIDS)
    for seed, grids in enumerate(CALLS):
        assert sum(t * h * w for t, h, w in grids) != traced
        pixels = random_pixels(grids, engine.vision.config.patch_dim, seed)
        ref = ours.encode(pixels, grids)
        atol = TOL * max(1.0, float(ref.abs().max()))
        torch.testing.assert_close(ort.encode(pixels, grids), ref, rtol=0, atol=atol)
        torch.testing.assert_close(grouped.encode(pixels, grids), ref, rtol=0, atol=atol)


@pytest.mark.parametrize("preset", PRESETS)
def test_validation_json_holds_vision_errors(build_tiny, preset: str) -> None:
    root = build_tiny(preset)
    report = json.loads((root / "validation.json").read_text())
    vision = report["vision"]
    assert set(vision["pairs"]) == {"pytorch_vs_hf", "onnxruntime_vs_pytorch", "onnxruntime_vs_hf"}
    assert vision["tolerance"]["max_abs_err_over_scale"] == TOL      # the report may not loosen its own limit
    for pair in vision["pairs"].values():
        assert pair["passed"] and 0 < pair["max_rel_err"] <= TOL
    assert any(len(g) > 1 for g in vision["grids"]) and any(t > 1 for g in vision["grids"] for t, _, _ in g)
    assert vision["passed"] and report["passed"] and report["greedy_agreement"] == 1.0
    summary = json.loads((root / "engine.json").read_text())["validation"]["vision"]
    assert summary["passed"] and summary["pytorch_vs_hf_max_rel_err"] == vision["pairs"]["pytorch_vs_hf"]["max_rel_err"]


def test_bf16_build_stores_bf16_tower_and_validates(build_tiny) -> None:
    engine = load_engine(build_tiny("tiny-qwen2-vl", "bf16"))
    assert engine.vision.config.dtype == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in engine.vision.load_weights().values())
    report = json.loads((engine.root / "validation.json").read_text())
    assert report["passed"] and report["vision"]["passed"], report["vision"]
