"""When does the int8 weight-only GEMM pay on this CPU? `torch._weight_int8pack_mm` against `F.linear`.

What it is for: the table in docs/perf/quantization.md. For two weight shapes and 1 / 16 rows it times
F.linear in fp32 and bf16 on the dequantized weights and the int8 GEMM with fp32 and bf16 activations,
best of 5 x 30 calls, in milliseconds, as Markdown table rows.
Not for: tests (no timing is asserted anywhere) or GPUs.

    python benchmarks/quant_gemm_cpu.py [--threads 1]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = ((4864, 896), (1536, 512))      # Qwen2.5-0.5B and small-qwen2 MLP weights [N, K]


def best_ms(fn: Callable[[], torch.Tensor], calls: int = 30, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| weight [N x K] | rows | F.linear fp32 | F.linear bf16 | int8pack, fp32 act. | int8pack, bf16 act. |")
    for n, k in SHAPES:
        w = torch.randn(n, k)
        scale = w.abs().amax(1) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        w_fp32 = q.float() * scale[:, None]
        w_bf16, scale_bf16 = w_fp32.bfloat16(), scale.bfloat16()
        for rows in (1, 16):
            x = torch.randn(rows, k)
            x_bf16 = x.bfloat16()
            times = [best_ms(lambda: F.linear(x, w_fp32)), best_ms(lambda: F.linear(x_bf16, w_bf16)),
                     best_ms(lambda: torch._weight_int8pack_mm(x, q, scale)),
                     best_ms(lambda: torch._weight_int8pack_mm(x_bf16, q, scale_bf16))]
            print(f"| {n} x {k} | {rows} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


if __name__ == "__main__":
    main()
