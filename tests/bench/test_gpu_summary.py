"""benchmarks/gpu_summary.py (the GPU suite's last table) on recorded trtserve-bench JSON, its target
checks, and the suite script's shell syntax (the suite itself needs a GPU: benchmarks/gpu_suite.sh)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "benchmarks" / "gpu_summary.py")
assert spec is not None and spec.loader is not None
gpu_summary = importlib.util.module_from_spec(spec)
sys.modules["gpu_summary"] = gpu_summary        # dataclasses look their module up
spec.loader.exec_module(gpu_summary)
Row = gpu_summary.Row


def test_rows_from_recorded_bench_json(capsys) -> None:
    record = ROOT / "docs" / "perf" / "bench_small-qwen2_cpu.json"
    assert gpu_summary.main([str(record)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["model", "workload", "c"] and len(lines) == 4     # header + c = 1, 4, 16
    rows = gpu_summary.rows_of(json.loads(record.read_text()))
    assert [r.concurrency for r in rows] == [1, 4, 16]
    assert all(r.hf_tok_s and abs(r.ratio - r.tok_s / r.hf_tok_s) < 1e-12 for r in rows)


def test_issue_targets() -> None:
    fast = Row("qwen2.5-0.5b-bf16", "synthetic", 1, 420.0, 2.4, 0.31, 70.0)
    assert fast.targets() == [">=5x HF: ok", "TPOT<=2.5ms: ok"]
    slow = Row("qwen2.5-0.5b-bf16", "synthetic", 32, 14000.0, 2.2, 0.3, 3000.0)
    assert slow.targets() == [">=5x HF: MISS", "tok/s>=15k: MISS"]
    vl = Row("qwen2-vl-2b-bf16", "img=1", 1, 300.0, 2.0, 0.36, None)
    assert vl.targets() == ["E2E<=0.35s: MISS"]


def test_suite_scripts_parse() -> None:
    for script in ("gpu_suite.sh", "gpu_wheels.sh"):
        result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
