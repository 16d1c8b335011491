"""trtserve-bench against live tiny servers: token counts equal the server's own counters, every level
completes, the JSON schema stays stable, plots are valid PNGs, errors are clear, Ctrl-C keeps partial results.
No assertion on wall-clock times."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from bench.cli import build_parser, main, workload_spec
from bench.server_stats import GENERATED, ServerCounters
from bench.workloads import output_lens
from tests.helpers.grpc_fixtures import ServerProcess
from tests.helpers.vl_helpers import noise_image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOP_KEYS = {"schema", "partial", "meta", "runs"}
RUN_KEYS = {"system", "protocol", "label", "counts", "levels"}
LEVEL_KEYS = {"concurrency", "num_requests", "num_errors", "duration_s", "prompt_tokens", "output_tokens",
              "cached_tokens", "output_tok_s", "total_tok_s", "qps", "ttft_ms", "tpot_ms", "e2e_ms",
              "prefix_cache_hit_rate", "prefix_cache_source", "partial", "errors", "server_tokens"}
META_KEYS = {"date", "command", "target", "server_started_by_bench", "metrics_url", "model", "workload",
             "workload_label", "requests_per_level", "warmup", "concurrency", "client_device", "versions", "note"}


def bench(server: ServerProcess, out: Path, *args: str) -> dict:
    rc = main(["--target", f"grpc://{server.target}", "--metrics-url",
               f"http://127.0.0.1:{server.metrics_port}/metrics", "--no-progress", "--out", str(out), *args])
    assert rc == 0
    return json.loads(out.with_suffix(".json").read_text())


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100


def test_both_protocols_count_what_the_server_counted(grpc_server: ServerProcess, tmp_path: Path) -> None:
    report = bench(grpc_server, tmp_path / "text", "--protocol", "native,triton", "--concurrency", "1,3",
                   "--requests", "4", "--warmup", "1", "--input-len", "12", "--output-len", "5")
    assert set(report) == TOP_KEYS and report["schema"] == "trtserve-bench/1" and report["partial"] is False
    assert set(report["meta"]) == META_KEYS
    assert [r["label"] for r in report["runs"]] == ["trtserve native", "trtserve triton"]
    for run in report["runs"]:
        assert set(run) == RUN_KEYS
        assert [level["concurrency"] for level in run["levels"]] == [1, 3]
        for level in run["levels"]:
            assert set(level) == LEVEL_KEYS
            assert set(level["ttft_ms"]) == {"p50", "p99", "mean"}
            assert (level["num_requests"], level["num_errors"], level["partial"]) == (4, 0, False)
            assert (level["prompt_tokens"], level["output_tokens"]) == (4 * 12, 4 * 5)
            assert level["server_tokens"] == {"prompt_tokens": 48, "cached_tokens": level["cached_tokens"],
                                              "generated_tokens": 20}
            assert level["prefix_cache_hit_rate"] is not None
            assert level["output_tok_s"] > 0 and level["tpot_ms"]["p50"] is not None
    assert_png(tmp_path / "text.png")
    assert "trtserve triton" in (tmp_path / "text.md").read_text()


def test_shared_prefix_multi_turn_resends_history(grpc_server: ServerProcess, tmp_path: Path) -> None:
    """2 sessions of 2 turns: turn 2 = turn 1's prompt (32 + 4) + its 3 output tokens + 4 new tokens."""
    report = bench(grpc_server, tmp_path / "prefix", "--workload", "shared-prefix", "--prefix-len", "32",
                   "--input-len", "4", "--output-len", "3", "--multi-turn", "2", "--concurrency", "2",
                   "--requests", "4", "--warmup", "0")
    level = report["runs"][0]["levels"][0]
    assert (level["num_requests"], level["num_errors"]) == (4, 0)
    assert level["prompt_tokens"] == 2 * ((32 + 4) + (32 + 4 + 3 + 4))
    assert level["server_tokens"]["prompt_tokens"] == level["prompt_tokens"]
    assert level["server_tokens"]["cached_tokens"] == level["cached_tokens"] > 0
    assert 0 < level["prefix_cache_hit_rate"] < 1


def test_hf_baseline_side_by_side(grpc_server: ServerProcess, tiny_engine_dir: Path, tmp_path: Path) -> None:
    report = bench(grpc_server, tmp_path / "base", "--baseline", "hf", "--engine", str(tiny_engine_dir),
                   "--concurrency", "2", "--requests", "3", "--warmup", "1", "--input-len", "8:12",
                   "--output-len", "2:9", "--no-plot")
    ours, hf = report["runs"]
    assert hf["system"] == "hf-transformers" and hf["counts"]["source"] == str(
        json.loads((tiny_engine_dir / "engine.json").read_text())["source"]["path"])
    # Same prompts (the first protocol's), the same seeded spread of forced output lengths: each system
    # generated and counted exactly the lengths asked (HF's static batch runs to its longest and counts
    # each request's own).
    lengths = output_lens(workload_spec(build_parser().parse_args(["--output-len", "2:9"])), "native-c2", 3)
    assert len(set(lengths)) > 1
    assert hf["levels"][0]["prompt_tokens"] == ours["levels"][0]["prompt_tokens"]
    assert hf["levels"][0]["output_tokens"] == ours["levels"][0]["output_tokens"] == sum(lengths)
    assert "ratio native" in (tmp_path / "base.md").read_text()
    assert not (tmp_path / "base.png").exists()


def test_plot_command_draws_several_runs(grpc_server: ServerProcess, tmp_path: Path) -> None:
    bench(grpc_server, tmp_path / "a", "--concurrency", "1,2", "--requests", "2", "--warmup", "0",
          "--input-len", "6", "--output-len", "3", "--no-plot")
    (tmp_path / "b.json").write_text((tmp_path / "a.json").read_text())
    assert main(["plot", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "ab.png")]) == 0
    assert_png(tmp_path / "ab.png")
    (tmp_path / "bad.json").write_text("{}")
    assert main(["plot", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.png")]) == 2


def test_unreachable_target_and_unknown_model(grpc_server: ServerProcess, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", "127.0.0.1:1", "--connect-timeout", "1", "--no-progress",
                 "--out", str(tmp_path / "x")]) == 2
    assert "cannot reach grpc://127.0.0.1:1" in capsys.readouterr().err
    assert main(["--target", grpc_server.target, "--model", "nope", "--no-progress", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "model 'nope' is not served" in err and "tiny-qwen2" in err
    assert not (tmp_path / "x.json").exists()


def test_jsonl_images_over_both_protocols(build_tiny: Callable[..., Path], tmp_path: Path) -> None:
    """docvqa-style JSONL + image folder on the tiny VL engine, in a server the benchmark starts itself:
    the prompt tokens it reports (native: usage; Triton: Tokenize + image blocks) equal the server's."""
    engine = build_tiny("tiny-qwen2-vl")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        noise_image(i, 64 + 16 * i, 80).save(images / f"doc{i}.png")
    rows = [{"image": "doc0.png", "conversations": [{"from": "human", "value": "<image>\nWhat is the total?"},
                                                     {"from": "gpt", "value": "12"}]},
            {"images": ["doc1.png", "doc2.png"], "conversations": [{"from": "human", "value": "Who signed it?"}]}]
    jsonl = tmp_path / "docvqa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "vl"
    rc = main(["--engine", str(engine), "--protocol", "native,triton", "--workload", "jsonl", "--jsonl", str(jsonl),
               "--image-dir", str(images), "--images-per-request", "1:2", "--output-len", "4",
               "--concurrency", "1,2", "--requests", "3", "--warmup", "1", "--baseline", "hf", "--engine", str(engine),
               "--no-progress", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["meta"]["server_started_by_bench"] is True
    native, triton, hf = report["runs"]
    for run in (native, triton):
        for level in run["levels"]:
            assert (level["num_requests"], level["num_errors"], level["output_tokens"]) == (3, 0, 12)
            assert level["prompt_tokens"] == level["server_tokens"]["prompt_tokens"] > 3 * 10
    # HF got native's prompts and images, with vision blocks built by HF's own image processor.
    assert [x["prompt_tokens"] for x in hf["levels"]] == [x["prompt_tokens"] for x in native["levels"]]
    assert_png(out.with_suffix(".png"))


def test_ctrl_c_writes_partial_results(grpc_server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "bench.cli", "--target", grpc_server.target, "--no-progress",
               "--concurrency", "2,4", "--requests", "2000", "--warmup", "0", "--input-len", "8",
               "--output-len", "48", "--no-plot", "--out", str(out)]
    counters = ServerCounters(f"http://127.0.0.1:{grpc_server.metrics_port}/metrics")
    before = counters.snapshot()
    assert before is not None
    # SIGINT back to its default in the benchmark: a runner started in the background by a non-interactive shell
    # (`make test &`, nohup) ignores SIGINT, and an ignored signal stays ignored across exec, so the benchmark
    # would never see the Ctrl-C (both fresh-clone runs here failed this way, by the 60 s timeout)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Interrupt once 20 requests are done, or 15 s into the run if the counters cannot say (a scrape that
        # times out while the server is busy reads as 0): the benchmark has started by then (its start-up takes
        # a few seconds) and its 4000 requests take minutes, so it is mid-run either way.
        started = time.monotonic()
        while time.monotonic() < started + 15 and _generated(counters) < before.generated_tokens + 20 * 48:
            time.sleep(0.2)
        assert process.poll() is None, "the benchmark ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:                          # the server is the session's: never leave a benchmark sending to it
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["partial"] is True
    level = report["runs"][0]["levels"][-1]
    assert level["partial"] is True and level["num_requests"] < 2000
    assert "(partial" in stdout


def _generated(counters: ServerCounters) -> float:
    samples = counters.scrape() or {}
    return samples.get(GENERATED, 0.0)
