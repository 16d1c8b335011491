"""The README's commands work: `make demo`, and a real-shape random-weight bf16 engine shows parity."""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.pipeline import BuildRequest, build_engine
from builder.progress import Progress
from engine_format.engine_dir import load_engine

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


def test_make_demo_runs(cache_dir: Path, build_tiny: Callable[..., Path], smollm2_engine_dir: Path) -> None:
    """With the session's build cache (offline tokenizer, random checkpoints, converted GGUF) and the session's
    three engines, built and validated with the demo's settings, so each of its build steps runs the CLI and
    finds its engine up to date (the same input hash as the CLI's; the CLI building tiny-qwen2 from nothing is
    tests/test_wheel.py's, building VL presets tests/builder's): no engine is built or validated twice."""
    engine_dir, vl_engine_dir = build_tiny("tiny-qwen2"), build_tiny("tiny-qwen2-vl")
    result = subprocess.run(["make", "-s", "demo", f"DEMO_ENGINE={engine_dir}", f"DEMO_VL_ENGINE={vl_engine_dir}",
                             f"DEMO_LLM_ENGINE={smollm2_engine_dir}", f"CACHE_DIR={cache_dir}"],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (engine_dir / "engine.json").is_file() and (vl_engine_dir / "vision" / "config.json").is_file()
    for built in (engine_dir, smollm2_engine_dir, vl_engine_dir):
        assert f"{built}: up to date" in result.stdout, result.stdout[-2000:]
    assert re.search(r"finish|->", result.stdout), result.stdout[-2000:]
    image_part = result.stdout.split("a chat request with one image", 1)
    assert len(image_part) == 2 and "[finish: " in image_part[1], result.stdout[-2000:]


@pytest.mark.slow
def test_real_shape_qwen25_05b_random_weights_bf16_parity(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "qwen2.5-0.5b-bf16"
    build_engine(BuildRequest(model="qwen2.5-0.5b", output=out, dtype="bf16", random_weights=True,
                              cache_dir=cache_dir), Progress(6, enabled=False))
    engine = load_engine(out)
    cfg = engine.llm_config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.dtype) == (896, 24, 14, 2, 151936, "bfloat16")
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"], {k: v for k, v in report.items() if k != "prompts"}
    assert report["greedy_agreement"] >= 0.9
