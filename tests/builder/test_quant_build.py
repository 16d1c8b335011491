"""Every quantization mode built from a tiny preset: the checkpoint's names, dtypes and shapes as TensorRT-LLM's
loader reads them, the validation against the unquantized model passing its tolerance (and failing for a
broken checkpoint), Model Optimizer's HF export, and the engines served through the native API and the Triton
ensemble with greedy output equal to the in-process quantized reference."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from builder.quantize_validate import validate_quantized
from engine_format.checkpoint_layout import expected_tensors
from engine_format.engine_dir import load_engine
from engine_format.quant_config import QUANT_CONFIG_KEYS
from engine_format.safetensors_check import read_safetensors_header
from tests.helpers.grpc_fixtures import ServerProcess
from tests.helpers.quant_engines import assert_served_greedy_matches_reference, build_quant_engines, serve_engines

PRESET = "tiny-qwen2-h128"        # hidden 128 / intermediate 256: AWQ's group of 128 divides both
# name -> (dtype, --quant, --kv-cache-dtype, --calib-size, --export-hf)
ENGINES = {
    "int8wo": ("bf16", "int8_wo", "int8", 24, False),
    "fp8": ("fp32", "fp8", "fp8", 24, True),
    "sq": ("fp32", "w8a8_sq", None, 24, False),
    "awq": ("fp32", "int4_awq", None, 2, False),
}
L0 = "transformer.layers.0"
# Written out by hand from TensorRT-LLM's layers (tensorrt_llm/quantization/layers.py) for layer 0's qkv
# (out 256 = (4 + 2 * 2) heads * 32, in 128) and mlp.proj (out 128, in 256); not derived from our layout code.
QKV_TENSORS = {
    "int8wo": {"weight": ("I8", (128, 256)), "per_channel_scale": ("BF16", (256,)), "bias": ("BF16", (256,))},
    "fp8": {"weight": ("F8_E4M3", (256, 128)), "weights_scaling_factor": ("F32", (1,)),
            "activation_scaling_factor": ("F32", (1,)), "bias": ("F32", (256,))},
    "sq": {"weight": ("I8", (256, 128)), "weights_scaling_factor": ("F32", (256,)),
           "activation_scaling_factor": ("F32", (1,)), "prequant_scaling_factor": ("F32", (128,)),
           "bias": ("F32", (256,))},
    "awq": {"weight": ("I8", (128, 128)), "weights_scaling_factor": ("F32", (256, 1)),
            "prequant_scaling_factor": ("F32", (128,)), "bias": ("F32", (256,))},
}
ALGOS = {"int8wo": ("W8A16", "INT8"), "fp8": ("FP8", "FP8"), "sq": ("W8A8_SQ_PER_CHANNEL", None),
         "awq": ("W4A16_AWQ", None)}


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    return build_quant_engines(PRESET, ENGINES, tmp_path_factory.mktemp("quant-engines"), cache_dir)


@pytest.mark.parametrize("name", list(ENGINES))
def test_checkpoint_as_tensorrt_llm_reads_it(engines: dict[str, Path], name: str) -> None:
    engine = engines[name]
    config = json.loads((engine / "llm" / "config.json").read_text())
    quant = config["quantization"]
    assert set(quant) <= set(QUANT_CONFIG_KEYS)
    assert (quant["quant_algo"], quant["kv_cache_quant_algo"]) == ALGOS[name]
    assert quant["exclude_modules"] == ["lm_head"] and quant["has_zero_point"] is False
    header = read_safetensors_header(engine / "llm" / "rank0.safetensors", "rank0")
    for suffix, spec in QKV_TENSORS[name].items():
        assert header[f"{L0}.attention.qkv.{suffix}"] == spec, suffix
    assert f"{L0}.attention.qkv.weight" in header and f"{L0}.mlp.proj.weight" in header
    assert header["lm_head.weight"][0] == config["dtype"].replace("float32", "F32").replace("bfloat16", "BF16")
    kv = ALGOS[name][1]
    for tensor in ("kv_cache_scaling_factor", "kv_cache_rcp_scaling_factor"):
        assert (header.get(f"{L0}.attention.{tensor}") == ("F32", (1,))) == (kv is not None)
    loaded = load_engine(engine)
    assert {n: (s.dtype, s.shape) for n, s in expected_tensors(loaded.llm_config).items()} == header


@pytest.mark.parametrize("name", list(ENGINES))
def test_validation_against_unquantized_model(engines: dict[str, Path], name: str) -> None:
    report = json.loads((engines[name] / "validation.json").read_text())
    assert report["passed"] and report["reference"].startswith("the same model unquantized")
    tol = report["tolerance"]
    assert report["top1_agreement"] >= tol["min_top1_agreement"] and report["kl_divergence"] <= tol["max_kl"]
    assert report["perplexity"]["ratio"] <= tol["max_ppl_ratio"] and report["positions"] > 50 and report["perplexity"]["num_tokens"] > 100
    manifest = json.loads((engines[name] / "engine.json").read_text())
    assert manifest["build"]["quantization"] == ENGINES[name][1]
    assert manifest["quantization"]["calibration"]["tool"].startswith("nvidia-modelopt")
    if name == "fp8":
        assert "dequantized ONCE AT LOAD" in manifest["quantization"]["runtime_kernels"]["cpu"]


def test_broken_checkpoint_fails_validation(engines: dict[str, Path]) -> None:
    """int8 scales in the wrong channel order: the tolerance catches it."""
    from builder.convert import convert_state_dict, read_hf_state_dict
    from tests.conftest import hf_dir_of

    engine = load_engine(engines["sq"])
    float_cfg = dataclasses.replace(engine.llm_config, quant=dataclasses.replace(engine.llm_config.quant,
                                                                                 quant_algo=None))
    float_tensors = convert_state_dict(read_hf_state_dict(hf_dir_of(engines["sq"])), float_cfg)
    broken = {k: (v.flip(0) if k.endswith("weights_scaling_factor") else v) for k, v in engine.weights.items()}
    report = validate_quantized(dataclasses.replace(engine, weights=broken), float_cfg, float_tensors)
    assert not report["passed"] and report["kl_divergence"] > report["tolerance"]["max_kl"]


def test_broken_int4_checkpoint_fails_against_the_int4_reference(engines: dict[str, Path]) -> None:
    """int4 nibbles swapped (rows 2i and 2i+1 exchanged): the engine agrees worse than round-to-nearest int4 of the
    same weights, so the int4 reference does not excuse it, and its KL is outside the tolerance."""
    from builder.convert import convert_state_dict, read_hf_state_dict
    from builder.quantize_validate import INT4_REFERENCE_SLACK
    from tests.conftest import hf_dir_of

    engine = load_engine(engines["awq"])
    float_cfg = dataclasses.replace(engine.llm_config, quant=dataclasses.replace(engine.llm_config.quant,
                                                                                 quant_algo=None))
    float_tensors = convert_state_dict(read_hf_state_dict(hf_dir_of(engines["awq"])), float_cfg)

    def swapped(t: torch.Tensor) -> torch.Tensor:
        u = t.view(torch.uint8)
        return (((u & 0x0F) << 4) | (u >> 4)).view(torch.int8)

    broken = {k: (swapped(v) if k.endswith(".weight") and v.dtype == torch.int8 else v) for k, v in engine.weights.items()}
    report = validate_quantized(dataclasses.replace(engine, weights=broken), float_cfg, float_tensors)
    reference = report["int4_reference"]
    assert not report["passed"] and report["top1_passed_by"] == "failed"
    assert reference["engine_top1_agreement"] < reference["top1_agreement"] - INT4_REFERENCE_SLACK
    assert report["kl_divergence"] > report["tolerance"]["max_kl"] > reference["kl_divergence"]


def test_export_hf_is_model_optimizer_unified_checkpoint(engines: dict[str, Path]) -> None:
    hf = engines["fp8"] / "llm" / "hf"
    quant = json.loads((hf / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8" and quant["kv_cache_quant_algo"] == "FP8"
    header = read_safetensors_header(next(hf.glob("*.safetensors")), "hf")
    assert header["model.layers.0.self_attn.q_proj.weight"] == ("F8_E4M3", (128, 128))
    assert (hf / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def server(engines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serve_engines(engines, tmp_path_factory.mktemp("quant-logs")) as process:
        yield process


@pytest.mark.parametrize("name", list(ENGINES))
def test_served_greedy_matches_quantized_reference(engines: dict[str, Path], server: ServerProcess,
                                                   name: str) -> None:
    assert_served_greedy_matches_reference(engines[name], server, name, 12)
