"""The builder: manifest contents, skip-when-unchanged, --force, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.cli import main as build_main
from builder.pipeline import BuildRequest, build_engine
from builder.presets import PresetError, load_preset, preset_from_dict
from builder.progress import Progress
from builder.source import SourceError
from engine_format.engine_dir import FORMAT_VERSION, load_engine


def test_manifest_describes_the_engine(build_tiny) -> None:
    engine = build_tiny("tiny-qwen2")
    manifest = json.loads((engine / "engine.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["source"]["architecture"] == "Qwen2ForCausalLM"
    assert manifest["source"]["preset"] == "tiny-qwen2"
    build = manifest["build"]
    assert build["quantization"] == "none" and build["dtype"] == "fp32"
    assert {"max_batch_size", "max_num_tokens", "max_input_len", "max_seq_len", "tokens_per_block",
            "kv_cache_reuse", "kv_cache_dtype"} <= set(build)
    assert set(manifest["files"]) >= {"llm/config.json", "llm/rank0.safetensors", "validation.json",
                                      "tokenizer/tokenizer.json"}
    assert all(not Path(p).is_absolute() for p in manifest["files"])
    validation = json.loads((engine / "validation.json").read_text())
    assert validation["passed"] is True
    assert validation["max_abs_err"] < 1e-4 and validation["greedy_agreement"] == 1.0
    assert manifest["validation"]["passed"] is True


def test_unchanged_rebuild_is_skipped_and_force_rebuilds(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "engine"
    request = BuildRequest(model="tiny-llama", output=out, cache_dir=cache_dir, validate=False)
    first = build_engine(request, Progress(6, enabled=False))
    assert not first.skipped
    mtime = (out / "llm" / "rank0.safetensors").stat().st_mtime_ns
    assert build_engine(request, Progress(6, enabled=False)).skipped
    assert (out / "llm" / "rank0.safetensors").stat().st_mtime_ns == mtime
    forced = BuildRequest(model="tiny-llama", output=out, cache_dir=cache_dir, validate=False, force=True)
    assert not build_engine(forced, Progress(6, enabled=False)).skipped
    changed = BuildRequest(model="tiny-llama", output=out, cache_dir=cache_dir, validate=False,
                           overrides={"max_seq_len": 1024})
    assert not build_engine(changed, Progress(6, enabled=False)).skipped
    assert load_engine(out).build.max_seq_len == 1024


def test_corrupted_output_is_rebuilt(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "engine"
    request = BuildRequest(model="tiny-qwen2", output=out, cache_dir=cache_dir, validate=False)
    build_engine(request, Progress(6, enabled=False))
    (out / "llm" / "config.json").write_text("{}")
    assert not build_engine(request, Progress(6, enabled=False)).skipped
    load_engine(out)


def test_fp16_and_bf16_builds_validate(build_tiny) -> None:
    for dtype in ("fp16", "bf16"):
        engine = load_engine(build_tiny("tiny-qwen2", dtype))
        assert engine.llm_config.dtype == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
        report = json.loads((engine.root / "validation.json").read_text())
        assert report["passed"], report


def test_unknown_model_and_bad_preset_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PresetError, match="unknown preset"):
        load_preset("no-such-preset")
    with pytest.raises(PresetError, match="build.max_input_len"):
        preset_from_dict({"name": "x", "family": "qwen2", "source": "random", "hf_config": {},
                          "build": {"max_input_len": 10, "max_seq_len": 5}}, "x.yaml")
    with pytest.raises(PresetError, match="family"):
        preset_from_dict({"name": "x", "family": "gpt2", "source": "random", "hf_config": {}}, "x.yaml")
    missing = tmp_path / "nowhere"
    assert build_main(["--model", str(missing) + "/", "--output", str(tmp_path / "o"), "--quiet"]) == 2
    assert "not a preset" in capsys.readouterr().err


def test_hub_preset_offline_says_what_to_do(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="RANDOM_WEIGHTS=1"):
        build_engine(BuildRequest(model="qwen2.5-0.5b", output=tmp_path / "o", cache_dir=cache_dir),
                     Progress(6, enabled=False))
    assert not (tmp_path / "o").exists()
