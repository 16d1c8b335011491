"""A corrupt `vision/` part of an engine directory fails to load with an error naming the file and the
field; the vision validation fails when the tower's weights change; large towers export with external data."""
from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.validate_vision import validate_vision
from builder.vision_export import ONNX_DATA_FILE, export_vision_onnx
from builder.vision_trt import patch_profile, shape_ranges, tensorrt_missing_reason
from engine_format.engine_dir import MANIFEST, load_engine
from engine_format.errors import EngineLoadError
from runtime.vision.vision_encoder import OnnxVisionEncoder, TorchVisionEncoder, load_vision_encoder
from tests.conftest import hf_dir_of
from tests.engine_format.test_load_guards import expect_error, manifest, resign

WEIGHTS = "vision/encoder.safetensors"
CONFIG = "vision/config.json"


@pytest.fixture(params=["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def vl_copy(request: pytest.FixtureRequest, build_tiny, tmp_path: Path) -> Path:
    dst = tmp_path / "engine"
    shutil.copytree(build_tiny(request.param), dst)
    return dst


def _rewrite_weights(root: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(root / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(root / WEIGHTS))
    resign(root)


def _rewrite_config(root: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads((root / CONFIG).read_text())
    edit(data)
    (root / CONFIG).write_text(json.dumps(data))
    resign(root)


def test_intact_vl_engine_loads(vl_copy: Path) -> None:
    vision = load_engine(vl_copy).vision
    assert vision is not None and vision.onnx_path == (vl_copy / "vision" / "encoder.onnx")
    assert vision.plan_path is None and len(vision.load_weights()) > 0


def test_vision_tensors_are_read_only_for_the_pytorch_backend(vl_copy: Path, monkeypatch) -> None:
    import safetensors.torch

    read: list[str] = []
    real = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path, *a, **k: (read.append(path), real(path, *a, **k))[1])
    engine = load_engine(vl_copy)
    load_vision_encoder(engine, "onnxruntime")
    assert str(vl_copy / WEIGHTS) not in read
    load_vision_encoder(engine, "pytorch")
    assert str(vl_copy / WEIGHTS) in read


def test_vision_checksum_mismatch(vl_copy: Path) -> None:
    raw = bytearray((vl_copy / WEIGHTS).read_bytes())
    raw[-1] ^= 0xFF
    (vl_copy / WEIGHTS).write_bytes(bytes(raw))
    expect_error(vl_copy, WEIGHTS, "checksum mismatch")


def test_vision_tensor_shape_dtype_missing_unexpected(vl_copy: Path) -> None:
    name = "blocks.1.attn.qkv.weight"
    _rewrite_weights(vl_copy, lambda t: t.__setitem__(name, t[name][:-3].clone()))
    assert expect_error(vl_copy, WEIGHTS, "disagrees with vision/config.json").field == name
    _rewrite_weights(vl_copy, lambda t: t.__setitem__(name, torch.zeros(96, 32, dtype=torch.float16)))
    assert expect_error(vl_copy, WEIGHTS, "dtype F16").field == name
    _rewrite_weights(vl_copy, lambda t: t.pop(name))
    assert expect_error(vl_copy, WEIGHTS, "missing tensor").field == name
    _rewrite_weights(vl_copy, lambda t: t.update({name: torch.zeros(96, 32), "blocks.9.extra": torch.zeros(1)}))
    assert expect_error(vl_copy, WEIGHTS, "unexpected tensor").field == "blocks.9.extra"


def test_vision_config_disagrees_with_weights(vl_copy: Path) -> None:
    _rewrite_config(vl_copy, lambda d: d["vision"].__setitem__("depth", 3))
    assert expect_error(vl_copy, WEIGHTS, "missing tensor").field.startswith("blocks.2.")


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.pop("image_token_id"), "image_token_id"),
    (lambda d: d.__setitem__("model_type", "paligemma"), "model_type"),
    (lambda d: d["vision"].pop("patch_size"), "vision.patch_size"),
    (lambda d: d["preprocessing"].__setitem__("min_pixels", 10 ** 9), "preprocessing.min_pixels"),
    (lambda d: d["preprocessing"].__setitem__("merge_size", 3), "preprocessing.merge_size"),
    (lambda d: d["preprocessing"].__setitem__("image_std", [0.5, 0.5]), "preprocessing.image_std"),
    (lambda d: d.__setitem__("out_hidden_size", 65), "out_hidden_size"),
    (lambda d: d.__setitem__("video_token_id", 10 ** 6), "video_token_id"),
])
def test_bad_vision_config(vl_copy: Path, edit: Callable[[dict], None], field: str) -> None:
    _rewrite_config(vl_copy, edit)
    assert expect_error(vl_copy, CONFIG).field == field


def test_vision_config_bad_json(vl_copy: Path) -> None:
    (vl_copy / CONFIG).write_text("{")
    resign(vl_copy)
    expect_error(vl_copy, CONFIG, "invalid JSON")


@pytest.mark.parametrize("key", ["config", "weights", "onnx"])
def test_vision_path_escaping_directory(vl_copy: Path, key: str) -> None:
    resign(vl_copy, lambda d: d["components"]["vision"].__setitem__(key, "../../outside"))
    err = expect_error(vl_copy, MANIFEST, "escapes")
    assert err.field == f"components.vision.{key}"


def test_listed_onnx_file_missing(vl_copy: Path) -> None:
    (vl_copy / "vision" / "encoder.onnx").unlink()
    data = manifest(vl_copy)
    del data["files"]["vision/encoder.onnx"]
    (vl_copy / MANIFEST).write_text(json.dumps(data))
    expect_error(vl_copy, "vision/encoder.onnx", "missing")


def test_vl_llm_without_vision_component(vl_copy: Path) -> None:
    resign(vl_copy, lambda d: d["components"].pop("vision"))
    assert expect_error(vl_copy, MANIFEST, "needs a vision tower").field == "components.vision"


def test_llm_mrope_section_must_sum_to_half_head(vl_copy: Path) -> None:
    path = vl_copy / "llm" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rotary_scaling"]["mrope_section"] = [2, 3, 4]
    path.write_text(json.dumps(cfg))
    resign(vl_copy)
    assert expect_error(vl_copy, "llm/config.json", "head_size / 2 (8)").field == "rotary_scaling.mrope_section"
    cfg["position_embedding_type"] = "rope_gpt_neox"
    cfg["rotary_scaling"] = None
    path.write_text(json.dumps(cfg))
    resign(vl_copy)
    assert expect_error(vl_copy, "llm/config.json", "mrope").field == "position_embedding_type"


def test_vision_validation_fails_when_weights_change(vl_copy: Path) -> None:
    """The tower's weights no longer match the checkpoint: PyTorch disagrees with HF and with the ONNX graph."""
    _rewrite_weights(vl_copy, lambda t: t["merger.mlp.2.bias"].add_(0.01))
    report = validate_vision(load_engine(vl_copy), hf_dir_of(vl_copy))
    assert not report["passed"]
    assert not report["pairs"]["pytorch_vs_hf"]["passed"] and not report["pairs"]["onnxruntime_vs_pytorch"]["passed"]
    assert report["pairs"]["onnxruntime_vs_hf"]["passed"]          # the ONNX graph was exported before the edit
    assert report["pairs"]["pytorch_vs_hf"]["max_abs_err"] == pytest.approx(0.01, rel=1e-3)


def test_external_data_export_runs_on_onnxruntime(vl_copy: Path, tmp_path: Path) -> None:
    engine = load_engine(vl_copy)
    weights = engine.vision.load_weights()
    out = tmp_path / "vision"
    out.mkdir()
    exported = export_vision_onnx(out, engine.vision.config, weights, tmp_path, external_data_bytes=0)
    assert exported.onnx_data == f"vision/{ONNX_DATA_FILE}" and (out / ONNX_DATA_FILE).stat().st_size > 10_000
    assert (out / "encoder.onnx").stat().st_size < 100_000        # weights live in the data file
    grids = [(1, 6, 4), (2, 4, 4)]
    pixels = torch.randn(56, engine.vision.config.patch_dim, generator=torch.Generator().manual_seed(3))
    ref = TorchVisionEncoder(engine.vision.config, weights, torch.device("cpu")).encode(pixels, grids)
    got = OnnxVisionEncoder(str(out / "encoder.onnx"), engine.vision.config).encode(pixels, grids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_tensorrt_profile_without_tensorrt(vl_copy: Path) -> None:
    cfg = load_engine(vl_copy).vision.config
    if importlib.util.find_spec("tensorrt") is None:
        assert "tensorrt is not installed" in tensorrt_missing_reason()
    profile = patch_profile(cfg)
    assert (profile.min, profile.opt, profile.max) == (16, 256, 256)    # 4*28*28 .. 64*28*28 pixels
    ranges = shape_ranges(cfg, profile)
    assert ranges["pixel_values"] == ((16, 1176), (256, 1176), (256, 1176))
    assert ranges["cu_seqlens"][2] == (65,)
    assert ("window_index" in ranges) == cfg.uses_windows


def test_garbage_onnx_encoder_names_the_file(vl_copy: Path) -> None:
    """An encoder.onnx that is not ONNX (checksums re-signed): ONNX Runtime's InvalidProtobuf becomes an
    EngineLoadError naming the file when the engine's vision encoder is created."""
    (vl_copy / "vision" / "encoder.onnx").write_bytes(b"\x08\x07garbage, not a protobuf model" * 64)
    resign(vl_copy)
    engine = load_engine(vl_copy)
    with pytest.raises(EngineLoadError, match=r"^vision/encoder\.onnx: ONNX Runtime cannot load it \(") as info:
        load_vision_encoder(engine, "onnxruntime")
    assert info.value.file == "vision/encoder.onnx"
