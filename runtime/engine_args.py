"""Command-line flags for the GPU-path engine settings, shared by trtserve-serve and trtserve-generate.

What it is for: one definition of --kv-cache-max-bytes, --gpu-memory-fraction,
--no-cuda-graphs, --op-backend, --overlap and --cpu-threads (EngineConfig fields; unset flags leave
the defaults and TRTSERVE_* environment values in force).
Not for: the other flags of either tool.
"""
from __future__ import annotations

import argparse

from runtime.config import OP_BACKENDS, OVERLAP_MODES


def add_engine_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-max-bytes", type=int,
                        help="hard cap on the KV-cache pool in bytes, on any device (default: no cap)")
    parser.add_argument("--gpu-memory-fraction", type=float,
                        help="share of total GPU memory for weights + profiled peak + KV pool (0.9)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="run decode steps eagerly on CUDA instead of replaying captured graphs")
    parser.add_argument("--op-backend", choices=OP_BACKENDS,
                        help="custom ops: auto (Triton kernels on CUDA), reference, triton")
    parser.add_argument("--overlap", choices=OVERLAP_MODES,
                        help="schedule and build step N+1 while step N runs: auto (on for CUDA; CPU: "
                             "runtime/core/overlap.py says why), on, off")
    parser.add_argument("--cpu-threads", type=int,
                        help="torch threads of the engine on CPU. 0 (default): auto: served, each step runs on "
                             "1 thread when its GEMM work (tokens x weight elements) is small, else on all cores "
                             "while the measured step times say they pay (runtime/core/thread_policy.py); "
                             "trtserve-generate: torch's default, all cores. "
                             "N >= 1: N threads for every step")
