"""trtserve-bench against servers that are not (known to be) trtserve: the OpenAI protocol over HTTP, and the
Triton protocol with `--tokenizer DIR` (no native API used, as against a stock Triton server). Token counts
equal the server's own counters. No assertion on wall-clock times."""
from __future__ import annotations

import json
from pathlib import Path

from bench.cli import main
from tests.helpers.grpc_fixtures import ServerProcess


def run(server: ServerProcess, out: Path, *args: str) -> dict:
    rc = main(["--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics", "--no-progress", "--no-plot",
               "--concurrency", "1,3", "--requests", "4", "--warmup", "1", "--input-len", "12", "--output-len", "5",
               "--out", str(out), *args])
    assert rc == 0
    return json.loads(out.with_suffix(".json").read_text())


def assert_counts(report: dict, labels: list[str]) -> None:
    assert [r["label"] for r in report["runs"]] == labels
    for run_ in report["runs"]:
        for level in run_["levels"]:
            assert (level["num_requests"], level["num_errors"]) == (4, 0)
            assert (level["prompt_tokens"], level["output_tokens"]) == (4 * 12, 4 * 5)
            assert level["server_tokens"]["prompt_tokens"] == 48 and level["server_tokens"]["generated_tokens"] == 20
            assert level["ttft_ms"]["p50"] is not None and level["output_tok_s"] > 0


def test_openai_protocol_next_to_the_grpc_ones(grpc_server: ServerProcess, tmp_path: Path) -> None:
    report = run(grpc_server, tmp_path / "all", "--target", f"grpc://{grpc_server.target}",
                 "--target", grpc_server.http_url, "--protocol", "native,openai")
    assert_counts(report, ["trtserve native", "trtserve openai"])
    assert report["runs"][1]["counts"]["output_tokens"].startswith("usage.completion_tokens")
    assert "trtserve openai" in (tmp_path / "all.md").read_text()


def test_any_server_with_a_local_tokenizer(grpc_server: ServerProcess, tiny_engine_dir: Path,
                                           tmp_path: Path) -> None:
    tokenizer = str(tiny_engine_dir / "tokenizer")
    report = run(grpc_server, tmp_path / "openai", "--target", f"{grpc_server.http_url}/v1",
                 "--tokenizer", tokenizer, "--protocol", "openai", "--system", "other")
    assert_counts(report, ["other openai"])
    report = run(grpc_server, tmp_path / "triton", "--target", f"grpc://{grpc_server.target}",
                 "--tokenizer", tokenizer, "--tokens-per-block", "16", "--protocol", "triton",
                 "--model", "tiny-qwen2-fp32")      # the engine name: the server counters are labelled with it
    assert_counts(report, ["server triton"])
    assert report["meta"]["model"]["triton_model"] == "ensemble"


def test_protocols_need_their_targets(grpc_server: ServerProcess, tmp_path: Path, capsys) -> None:
    args = ["--no-progress", "--out", str(tmp_path / "x")]
    assert main(["--target", f"grpc://{grpc_server.target}", "--protocol", "openai", *args]) == 2
    assert "needs an HTTP target" in capsys.readouterr().err
    assert main(["--target", grpc_server.http_url, "--protocol", "openai", *args]) == 2
    assert "--tokenizer" in capsys.readouterr().err
