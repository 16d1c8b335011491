"""Bad quantization input: one line on stderr naming the flag and the reason, exit code 2, before any work
(no engine directory, no calibration); and the loader refusing a quantized checkpoint that disagrees with its
config."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from builder.cli import main
from engine_format.engine_dir import EngineLoadError, load_engine


def run_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, cache_dir: Path, *flags: str,
            model: str = "tiny-qwen2") -> str:
    out = tmp_path / "engine"
    code = main(["--model", model, "--output", str(out), "--cache-dir", str(cache_dir), "--quiet", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists(), err
    errors = [line for line in err.splitlines() if "error" in line]     # (progress bars of a first preset build)
    assert len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


def test_unknown_mode_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny-qwen2", "--quant", "int3"])
    assert exc.value.code == 2 and "--quant" in capsys.readouterr().err


def test_awq_group_must_divide_hidden(capsys: pytest.CaptureFixture[str], tmp_path: Path, cache_dir: Path) -> None:
    err = run_cli(capsys, tmp_path, cache_dir, "--quant", "int4_awq")
    assert "--quant int4_awq" in err and "hidden_size 64" in err and "128" in err


@pytest.mark.parametrize(("content", "reason"), [
    ("", "holds no calibration samples"),
    ("\n\n", "holds no calibration samples"),
    ("just some text\n", "line 1 is not JSON"),
    ('{"text": "ok"}\n[1, 2]\n', "line 2: expected a JSON object"),
    ('{"text": ""}\n', 'needs a non-empty string "text"'),
    ('{"text": "a cat", "image": "cat.png"}\n', "has images, but the model is a text model"),
])
def test_bad_calibration_data(capsys: pytest.CaptureFixture[str], tmp_path: Path, cache_dir: Path, content: str,
                              reason: str) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text(content)
    err = run_cli(capsys, tmp_path, cache_dir, "--quant", "int8_wo", "--calib-data", str(data))
    assert err.startswith("trtserve-build: error: --calib-data:") and reason in err


def test_bad_calibration_size_and_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path, cache_dir: Path) -> None:
    assert "--calib-size" in run_cli(capsys, tmp_path, cache_dir, "--quant", "fp8", "--calib-size", "0")
    assert "--export-hf: needs --quant" in run_cli(capsys, tmp_path, cache_dir, "--kv-cache-dtype", "int8",
                                                   "--export-hf")
    assert "no int8 KV cache" in run_cli(capsys, tmp_path, cache_dir, "--quant", "fp8", "--kv-cache-dtype", "int8",
                                         "--export-hf")
    missing = tmp_path / "missing.jsonl"
    assert "is not a file" in run_cli(capsys, tmp_path, cache_dir, "--quant", "fp8", "--calib-data", str(missing))


def test_loader_refuses_quantization_that_disagrees_with_tensors(tiny_engine_dir: Path, tmp_path: Path) -> None:
    """A float checkpoint whose config claims W8A16: the first quantized tensor is named as missing."""
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine_dir, engine)
    config_path = engine / "llm" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization"] = {"quant_algo": "W8A16", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    config_path.write_text(json.dumps(config))
    with pytest.raises(EngineLoadError, match=r"rank0.safetensors: transformer\.layers\.0\.attention\.\w+\.\w+: "
                                               r"missing tensor"):
        load_engine(engine, verify_checksums=False)
    config["quantization"] = {"quant_algo": "W8A16", "kv_cache_quant_algo": None, "use_fp8": True}
    config_path.write_text(json.dumps(config))
    with pytest.raises(EngineLoadError, match=r"quantization\.use_fp8: unknown key"):
        load_engine(engine, verify_checksums=False)
    config["quantization"] = {"quant_algo": "W4A8_AWQ"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(EngineLoadError, match=r"quantization\.quant_algo: 'W4A8_AWQ' is not served"):
        load_engine(engine, verify_checksums=False)
