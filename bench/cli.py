"""`trtserve-bench`: closed-loop concurrency sweeps against trtserve (or any Triton / OpenAI server), with an
HF baseline.

    trtserve-bench --target grpc://127.0.0.1:8001 --protocol native,triton --concurrency 1,2,4,8,16,32 \\
        --requests 64 --input-len 128 --output-len 64 [--baseline hf --engine engines/qwen2.5-0.5b-bf16]
    trtserve-bench --engine engines/small-qwen2-fp32 --protocol native,triton,openai ...   # starts a server
    trtserve-bench --target http://127.0.0.1:8000 --protocol openai --tokenizer DIR ...     # any OpenAI server
    trtserve-bench --target grpc://triton:8001 --protocol triton --tokenizer DIR ...        # a stock Triton
    trtserve-bench plot a.json b.json --out both.png

Writes a table to stdout and PREFIX.json, PREFIX.md, PREFIX.png (`--out PREFIX`). Ctrl-C stops the
sweep, cancels the requests in flight, and still writes what was measured (marked partial).
Exit status: 0 done, 1 some requests failed, 2 bad arguments / target not usable, 130 interrupted.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

from bench.baseline import BaselineError, HFBaseline
from bench.report import BenchReport, load_report, tables
from bench.runner import PROTOCOLS, Sweep, SweepConfig, Target, TargetError, connect
from bench.server_stats import metrics_url_for
from bench.tokens import PromptLengthError
from bench.workloads import KINDS, IntRange, WorkloadSpec

EXIT_FAILED_REQUESTS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trtserve-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_argument_group("target")
    where.add_argument("--target", action="append", default=[],
                       help="grpc://HOST:PORT (or HOST:PORT; native, triton) or http://HOST:PORT (openai) of a "
                            "running server; repeat to give both")
    where.add_argument("--tokenizer", type=Path, help="HF tokenizer directory for a server without trtserve's "
                       "native API (a stock Triton server, another OpenAI-compatible server)")
    where.add_argument("--tokens-per-block", type=int, default=64, help="with --tokenizer: the server's KV "
                       "block size, to turn Triton's kv_cache_reused_blocks into tokens (default 64)")
    where.add_argument("--system", help="label of the measured server in the report (default: trtserve, or "
                       "'server' with --tokenizer)")
    where.add_argument("--engine", type=Path, help="engine directory: the HF baseline's source weights; "
                       "without --target, a server for this engine is started for the run")
    where.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                       help="extra trtserve-serve argument for the started server (repeatable)")
    where.add_argument("--protocol", default="native", help="comma-separated: native, triton, openai")
    where.add_argument("--model", default="", help="engine name (default: the only one served)")
    where.add_argument("--metrics-url", help="the server's Prometheus endpoint (default: gRPC port + 1)")
    where.add_argument("--no-server-metrics", action="store_true", help="do not read the server's counters")
    where.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the target")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", default="1,2,4,8,16,32", help="comma-separated levels")
    load.add_argument("--requests", type=int, default=64, help="requests per level")
    load.add_argument("--warmup", type=int, default=4, help="requests before the first level (not measured)")
    work = parser.add_argument_group("workload")
    work.add_argument("--workload", choices=KINDS, default="synthetic")
    work.add_argument("--input-len", default="128", help="prompt tokens: N or LOW:HIGH (synthetic, suffix of "
                      "shared-prefix, each new user turn of multi-turn)")
    work.add_argument("--output-len", default="64", help="output tokens, forced (ignore_eos / min_tokens): N or "
                      "LOW:HIGH (uniform per request, seeded by --seed and the level: every system gets the same "
                      "lengths; the HF baseline runs each static batch until its longest request is done and "
                      "counts each request's own length)")
    work.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: common prefix tokens")
    work.add_argument("--multi-turn", type=int, default=1, metavar="T", help="turns per session; each resends "
                      "the history")
    work.add_argument("--jsonl", type=Path, help="jsonl workload: conversations + image file names per line")
    work.add_argument("--image-dir", type=Path, help="folder the JSONL's image names are in")
    work.add_argument("--images-per-request", default="0", help="N or LOW:HIGH (uniform); JSONL records are "
                      "cut or topped up from --image-dir; without a folder, synthetic PNGs")
    work.add_argument("--image-size", type=int, default=448, help="side of synthetic images (pixels)")
    work.add_argument("--seed", type=int, default=0)
    base = parser.add_argument_group("baseline")
    base.add_argument("--baseline", choices=("hf",), help="also run HF transformers in-process (static batches)")
    base.add_argument("--baseline-device", default=None, help="default: cuda when available, else cpu")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, help="output prefix (default: trtserve-bench_MODEL_WORKLOAD)")
    out.add_argument("--note", default="", help="free text recorded in the JSON (machine state, ...)")
    out.add_argument("--no-plot", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    return parser


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(args.workload, IntRange.parse(args.input_len, "--input-len"),
                        IntRange.parse(args.output_len, "--output-len"), args.prefix_len, args.multi_turn,
                        args.jsonl, args.image_dir, IntRange.parse(args.images_per_request, "--images-per-request"),
                        args.image_size, args.seed)


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise ValueError(f"--concurrency: expected comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency: levels must be >= 1, got {text!r}")
    return levels


def parse_protocols(text: str) -> tuple[str, ...]:
    protocols = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"--protocol: each must be one of {PROTOCOLS}, got {text!r}")
    return protocols


def meta(args: argparse.Namespace, argv: list[str], target: Target, spec: WorkloadSpec,
         levels: tuple[int, ...], metrics_url: str | None, started_server: bool) -> dict[str, object]:
    import grpc
    import torch
    import transformers

    card = target.card
    device = {"machine": platform.machine(), "processor": platform.processor(), "system": platform.system(),
              "torch_threads": torch.get_num_threads(),
              "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join(["trtserve-bench", *argv]),
            "target": ", ".join(t for t in (target.address, target.http_url) if t), "server_started_by_bench": started_server, "metrics_url": metrics_url,
            "model": {"name": card.name, "max_batch_size": card.max_batch_size, "max_input_len": card.max_input_len,
                      "max_seq_len": card.max_seq_len, "tokens_per_block": card.tokens_per_block,
                      "vocab_size": card.vocab_size, "triton_model": target.triton_model},
            "workload": spec.describe(), "workload_label": spec.label(), "requests_per_level": args.requests,
            "warmup": args.warmup, "concurrency": list(levels), "client_device": device,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "grpcio": grpc.__version__,
                         "trtserve": _trtserve_version()},
            "note": args.note}


def _trtserve_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trtserve")
    except PackageNotFoundError:
        return "unknown"


def write_outputs(report: BenchReport, prefix: Path, plot: bool) -> list[Path]:
    written = [prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")]
    report.write_json(written[0])
    written[1].write_text(f"# trtserve-bench: {report.meta.get('workload_label', '')}\n\n"
                          f"`{report.meta.get('command', '')}`\n\n" + tables(report, markdown=True))
    if plot:
        from bench.plot import plot_reports

        written.append(plot_reports([("", report)], prefix.with_name(prefix.name + ".png"), _title(report)))
    return written


def _title(report: BenchReport) -> str:
    model = report.meta.get("model", {})
    name = model.get("name", "") if isinstance(model, dict) else ""
    return f"{name}: {report.meta.get('workload_label', '')}{' (partial)' if report.partial else ''}"


def run_command(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        levels = parse_levels(args.concurrency)
        protocols = parse_protocols(args.protocol)
        spec = workload_spec(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    if not args.target and args.engine is None:
        parser.error("give --target grpc://HOST:PORT / http://HOST:PORT, or --engine DIR to start a server")
    if args.baseline and args.engine is None:
        parser.error("--baseline hf needs --engine DIR (its engine.json names the source weights)")
    server = None
    try:
        if not args.target:
            from grpc_service.launcher import ServerProcess

            print(f"trtserve-bench: starting trtserve-serve --engine {args.engine}", file=sys.stderr)
            server = ServerProcess.start(["--engine", str(args.engine), *args.server_arg], Path(".cache/bench-logs"),
                                         own_group=True)
            address, http_url = server.target, (server.http_url if server.http_port else None)
            metrics_url = None if args.no_server_metrics else f"http://127.0.0.1:{server.metrics_port}/metrics"
        else:
            address, http_url = split_targets(args.target)
            default_metrics = metrics_url_for(address) if address else None
            metrics_url = None if args.no_server_metrics else (args.metrics_url or default_metrics)
        return _run(args, argv, address, http_url, protocols, levels, spec, metrics_url, server is not None)
    except (TargetError, BaselineError, PromptLengthError, ValueError) as exc:
        print(f"trtserve-bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if server is not None:
            server.stop()


def split_targets(targets: list[str]) -> tuple[str | None, str | None]:
    """(gRPC host:port, HTTP base URL) from the --target values."""
    address = http_url = None
    for value in targets:
        if value.startswith(("http://", "https://")):
            if http_url is not None:
                raise ValueError("--target: one http:// target at most")
            http_url = value.rstrip("/").removesuffix("/v1")
        else:
            if address is not None:
                raise ValueError("--target: one grpc:// target at most")
            address = value.removeprefix("grpc://")
    return address, http_url


def _run(args: argparse.Namespace, argv: list[str], address: str | None, http_url: str | None,
         protocols: tuple[str, ...], levels: tuple[int, ...], spec: WorkloadSpec, metrics_url: str | None,
         started_server: bool) -> int:
    target = connect(address, args.model, protocols, args.connect_timeout, http_url,
                     str(args.tokenizer) if args.tokenizer else None, args.tokens_per_block, args.system)
    report = BenchReport(meta(args, argv, target, spec, levels, metrics_url, started_server))
    baseline = None
    if args.baseline:
        import torch

        device = args.baseline_device or ("cuda" if torch.cuda.is_available() else "cpu")
        baseline = HFBaseline(args.engine, device)
    config = SweepConfig(protocols, levels, args.requests, args.warmup, spec, metrics_url, not args.no_progress)
    sweep = Sweep(config, target, report, baseline)
    if metrics_url and sweep.counters and not sweep.counters.available():
        print(f"trtserve-bench: no server metrics at {metrics_url}; prefix-cache hit rate from per-request "
              "counts only", file=sys.stderr)
        sweep.counters = None
        report.meta["metrics_url"] = None
    interrupted = False
    try:
        sweep.run()
    except KeyboardInterrupt:
        interrupted = report.partial = True
        print("\ntrtserve-bench: interrupted; what was measured so far:", file=sys.stderr)
    finally:
        sweep.close()
    print(tables(report))
    prefix = Path(args.out or f"trtserve-bench_{target.card.name}_{spec.kind}")
    for path in write_outputs(report, prefix, plot=not args.no_plot):
        print(f"wrote {path}")
    if interrupted:
        return EXIT_INTERRUPTED
    failed = sum(level.num_errors for run in report.runs for level in run.levels)
    return EXIT_FAILED_REQUESTS if failed else 0


def plot_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trtserve-bench plot", description="Several runs in one figure.")
    parser.add_argument("reports", nargs="+", type=Path, help="JSON files written by trtserve-bench")
    parser.add_argument("--out", type=Path, default=Path("trtserve-bench.png"))
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    from bench.plot import plot_reports

    try:
        reports = [(path.stem, load_report(path)) for path in args.reports]
    except (OSError, ValueError, KeyError) as exc:
        print(f"trtserve-bench plot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {plot_reports(reports, args.out, args.title)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return plot_command(argv[1:])
    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
