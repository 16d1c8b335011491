"""`trtserve-serve`: serve engine directories (or a Triton-style model repository) over gRPC.

Both gRPC APIs share one port: the native `trtserve.v1.LLMService` and KServe v2
`inference.GRPCInferenceService` (Triton's TensorRT-LLM backend models
ensemble / tensorrt_llm / preprocessing / postprocessing), plus grpc.health.v1
and server reflection. The OpenAI-compatible HTTP API (/v1/chat/completions,
/v1/completions, /v1/models, /health) has its own port (--http-port, default
8000; --no-http turns it off). Prometheus metrics are served over HTTP on their own port.
Options not given on the command line come from TRTSERVE_SERVER_* (server) and
TRTSERVE_* (engine) environment variables, then the defaults.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from grpc_service.config import EVENT_LOOPS, ServerConfig, ServerConfigError
from grpc_service.repository import RepositoryError
from runtime.config import CAPACITY_POLICIES, EngineConfig, EngineConfigError
from runtime.engine_args import add_engine_gpu_arguments
from engine_format.errors import EngineLoadError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trtserve-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--engine", type=Path, action="append", help="engine directory (repeatable)")
    source.add_argument("--model-repository", type=Path, help="Triton-style model repository (trtserve-repo)")
    p.add_argument("--host", help="listen address (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, help="gRPC port (default 8001; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002; 0 picks a free one)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve Prometheus metrics")
    p.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--no-http", action="store_true", help="do not serve the OpenAI-compatible HTTP API")
    p.add_argument("--max-queue-size", type=int, help="requests waiting beyond max_batch_size per model (64)")
    p.add_argument("--max-message-bytes", type=int, help="largest request / response message (64 MiB)")
    p.add_argument("--grace-period", type=float, help="seconds in-flight requests get after SIGTERM (30)")
    p.add_argument("--no-warmup", action="store_true", help="report SERVING without a warm-up request")
    p.add_argument("--no-engine-process", action="store_true",
                   help="run each engine core on a thread of the server process instead of its own process")
    p.add_argument("--event-loop", choices=EVENT_LOOPS,
                   help="the server's asyncio event loop (auto: uvloop where installed)")
    p.add_argument("--no-batch-scheduling", action="store_true",
                   help="keep the front end's threads under the normal scheduling policy (default: SCHED_BATCH "
                        "once the engine cores run, so their wakeups do not preempt the cores)")
    images = p.add_argument_group("images and video (vision-language engines)")
    images.add_argument("--max-images-per-request", type=int, help="images plus videos in one request (8)")
    images.add_argument("--max-image-pixels", type=int, help="width x height of one image or frame (4096 x 4096)")
    images.add_argument("--max-image-bytes", type=int, help="one encoded image or video (20 MiB)")
    images.add_argument("--max-video-frames", type=int, help="frames of one video (64)")
    images.add_argument("--allowed-image-dir", type=Path,
                        help="file:// image URLs and paths are read from inside this directory only "
                             "(default: none, every local path is refused)")
    images.add_argument("--allow-image-url-fetch", action="store_true",
                        help="fetch http(s):// image URLs (off by default: the server makes no outgoing requests)")
    images.add_argument("--image-fetch-timeout", type=float, help="seconds per http(s) image download (10)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks per engine (default: sized from memory)")
    p.add_argument("--capacity-policy", choices=CAPACITY_POLICIES)
    add_engine_gpu_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p.parse_args(argv)


def configs_from_args(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig]:
    message_bytes = args.max_message_bytes
    server = ServerConfig.from_env(
        engine_dirs=tuple(args.engine) if args.engine else None, model_repository=args.model_repository,
        host=args.host, port=args.port, metrics_port=args.metrics_port,
        enable_metrics=False if args.no_metrics else None, max_queue_size=args.max_queue_size,
        http_port=args.http_port, enable_http=False if args.no_http else None,
        max_receive_message_bytes=message_bytes, max_send_message_bytes=message_bytes,
        grace_period_s=args.grace_period, warmup=False if args.no_warmup else None,
        engine_process=False if args.no_engine_process else None,
        batch_scheduling=False if args.no_batch_scheduling else None,
        event_loop=args.event_loop,
        max_images_per_request=args.max_images_per_request, max_image_pixels=args.max_image_pixels,
        max_image_bytes=args.max_image_bytes, max_video_frames=args.max_video_frames,
        allowed_image_dir=args.allowed_image_dir, allow_image_url_fetch=True if args.allow_image_url_fetch else None,
        image_fetch_timeout_s=args.image_fetch_timeout)
    engine = EngineConfig.from_env(device=args.device, num_kv_blocks=args.num_kv_blocks,
                                   capacity_policy=args.capacity_policy, kv_cache_max_bytes=args.kv_cache_max_bytes,
                                   gpu_memory_fraction=args.gpu_memory_fraction,
                                   enable_cuda_graphs=False if args.no_cuda_graphs else None,
                                   op_backend=args.op_backend, overlap=args.overlap,
                                   cpu_threads=args.cpu_threads)
    return server, engine


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server_config, engine_config = configs_from_args(args)
    except (ServerConfigError, EngineConfigError) as exc:
        print(f"trtserve-serve: error: {exc}", file=sys.stderr)
        return 2
    from grpc_service import event_loop
    from grpc_service.server import Server

    try:
        return event_loop.run(Server(server_config, engine_config).run(), server_config.event_loop)
    except (EngineLoadError, RepositoryError, OSError, ValueError) as exc:
        print(f"trtserve-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
